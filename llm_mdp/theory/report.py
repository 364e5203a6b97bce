"""``verify``: every estimator of the paper against the exact gradient, as rows.

:func:`verify` builds the small set-up of ``docs/theory.md#eq-26`` (or takes an
:class:`~llm_mdp.theory.moments.ExactModel`), evaluates the theory weightings, every
registered advantage estimator (the built-ins in their paper configurations, any other
one generically), the aggregation modes and the KL estimators, and returns a
:class:`VerifyReport`. Its presentation (tables, ``llm-mdp verify``) is in
:mod:`llm_mdp.theory.display`, the bias/variance plot in :mod:`llm_mdp.plotting`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llm_mdp import estimators as est

from .kl import KLRow, kl_rows
from .moments import ExactModel
from .setups import SETUPS, echo_setup, make_policy, paper_setup
from .specs import ALL_EXACT, EstimatorSpec, GradientMoments, InputSpec

__all__ = [
    "EstimatorRow",
    "IdentityRow",
    "SetupInfo",
    "VerifyReport",
    "estimator_row",
    "identity_rows",
    "standard_specs",
    "verify",
]

Z_CRIT = 5.0
"""Monte Carlo rows: unbiased when every component is within ``Z_CRIT`` standard errors."""

BUILTIN_ADVANTAGES = ("reinforce", "rloo", "remax", "grpo", "gae", "trepo")


@dataclass(frozen=True)
class SetupInfo:
    """What :func:`verify` ran on."""

    policy: str
    num_params: int
    length_cap: str
    horizon: int
    gamma: float
    group_size: int
    seed: int
    num_responses: int
    num_nodes: int
    J: float
    grad_norm: float
    seconds: float = 0.0
    setup: str = "paper"


@dataclass(frozen=True)
class EstimatorRow:
    """One estimator's expected gradient and variance against ``grad J``.

    Attributes:
        section: ``"per-token"`` (single-response weightings), ``"group"``, ``"trepo"``
            (Monte Carlo prefix values), ``"aggregation"``, ``"registry"`` (other
            registered estimators, generic inputs).
        estimator: display name. ``registry``: the registry key (``None`` for weightings
            computed from the exact tables).
        method: ``"exact"``, ``"enumerated"`` (every ordered group) or ``"monte-carlo"``.
        n_responses: responses per draw (``G`` for group estimators).
        expected: theory's verdict: ``"unbiased"``, ``"scaled x<s>"``, ``"biased"`` or ``"?"``.
        max_abs_error, relative_error, cosine, projection: see
            :class:`~llm_mdp.theory.exact.Comparison`.
        trace_cov: trace of the covariance of one draw's gradient.
        trace_cov_per_response: ``trace_cov * n_responses`` (comparable across ``G``).
        z_max: Monte Carlo z-statistic (``None`` when exact). ``num_draws``: groups
            enumerated or samples.
        passed: the numbers match ``expected`` (``None`` when ``"?"``).
    """

    section: str
    estimator: str
    registry: str | None
    method: str
    n_responses: int
    expected: str
    max_abs_error: float
    relative_error: float
    cosine: float
    projection: float
    trace_cov: float
    trace_cov_per_response: float
    z_max: float | None
    num_draws: int | None
    passed: bool | None


@dataclass(frozen=True)
class IdentityRow:
    """An exact identity and how far from exact it is (``passed`` at ``tol``)."""

    identity: str
    max_abs_error: float
    passed: bool


@dataclass(frozen=True)
class VerifyReport:
    setup: SetupInfo
    identities: list[IdentityRow] = field(default_factory=list)
    rows: list[EstimatorRow] = field(default_factory=list)
    kl: list[KLRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        checks = [r.passed for r in self.identities] + [r.passed for r in self.rows]
        checks += [r.passed for r in self.kl]
        return all(c is not False for c in checks)

    def row(self, estimator: str) -> EstimatorRow:
        """The row with this display name (``KeyError`` otherwise)."""
        for r in self.rows:
            if r.estimator == estimator:
                return r
        raise KeyError(f"no row {estimator!r}; rows: {[r.estimator for r in self.rows]}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- rows


def _verdict(
    expected: str, mom: GradientMoments, model: ExactModel, tol: float
) -> tuple[bool | None, float, float, float, float, float | None]:
    cmp = model.compare(mom)
    scale = max(1.0, float(model.grad_J.abs().max()))
    if expected == "?":
        passed = None
    elif expected.startswith("scaled"):
        s = float(expected.split("x", 1)[1])
        target = s * model.grad_J
        sub = model.compare(mom, target)
        passed = (
            (sub.z_max <= Z_CRIT) if sub.z_max is not None else sub.max_abs_error <= tol * scale
        )
    else:
        unbiased = (
            cmp.z_max <= Z_CRIT if cmp.z_max is not None else cmp.max_abs_error <= tol * scale
        )
        passed = unbiased == (expected == "unbiased")
    return passed, cmp.max_abs_error, cmp.relative_error, cmp.cosine, cmp.projection, cmp.z_max


def estimator_row(
    model: ExactModel,
    moments: GradientMoments,
    *,
    section: str,
    estimator: str,
    registry: str | None,
    expected: str = "?",
    tol: float = 1e-8,
) -> EstimatorRow:
    """An :class:`EstimatorRow` from exact or Monte Carlo moments."""
    passed, err, rel, cos, proj, z = _verdict(expected, moments, model, tol)
    return EstimatorRow(
        section=section,
        estimator=estimator,
        registry=registry,
        method=moments.method,
        n_responses=moments.n_responses,
        expected=expected,
        max_abs_error=err,
        relative_error=rel,
        cosine=cos,
        projection=proj,
        trace_cov=moments.trace_cov,
        trace_cov_per_response=moments.trace_cov * moments.n_responses,
        z_max=z,
        num_draws=moments.num_draws,
        passed=passed,
    )


def _trepo_expected(inputs: InputSpec, horizon: int) -> str:
    """All positions known for every response -> unbiased (interpolation never used)."""
    m = inputs.anchors
    if m is None:
        return "unbiased"
    covers = m >= horizon - 1 if inputs.anchor_columns == "pair" else m >= horizon
    return "unbiased" if covers else "biased"


def standard_specs(
    model: ExactModel,
    group_size: int = 4,
    rollouts: Sequence[int] = (1, 4),
    anchors: Sequence[int] = (1, 2, 3),
    anchor_rollouts: int = 4,
    extra: bool = True,
) -> list[tuple[str, EstimatorSpec]]:
    """``(section, spec)`` for the registered estimators in the paper's configurations.

    Plus, with ``extra``, every other registered advantage estimator (added by a user)
    with :data:`~llm_mdp.theory.exact.ALL_EXACT` inputs and ``group_size`` responses.
    """
    g, h = group_size, model.tree.horizon
    at_one = "unbiased" if model.gamma == 1.0 else "biased"
    zra = InputSpec(token_rewards="zra")
    specs: list[tuple[str, EstimatorSpec]] = [
        (
            "per-token",
            EstimatorSpec("reinforce", label="REINFORCE: RM(W) (21)", expected="unbiased"),
        ),
        (
            "per-token",
            EstimatorSpec(
                "reinforce",
                inputs=InputSpec(baseline="value"),
                label="REINFORCE - V(prompt)",
                expected="unbiased",
            ),
        ),
        (
            "per-token",
            EstimatorSpec(
                "gae",
                {"lam": 1.0},
                inputs=InputSpec(token_rewards="true", values="zero"),
                label="(26) true r, return-to-go [gae, V=0]",
                expected=at_one,
            ),
        ),
        (
            "per-token",
            EstimatorSpec(
                "gae",
                {"lam": 1.0},
                inputs=dataclasses.replace(zra, values="zero"),
                label="(26) ZRA + gamma [gae, V=0]",
                expected=at_one,
            ),
        ),
        (
            "per-token",
            EstimatorSpec(
                "gae",
                {"lam": 1.0},
                inputs=dataclasses.replace(zra, values="exact"),
                label="PPO, exact critic [gae, lam=1]",
                expected=at_one,
            ),
        ),
        (
            "per-token",
            EstimatorSpec(
                "trepo",
                inputs=InputSpec(prefix_values="exact"),
                label="Thm 2 via trepo(exact V)",
                expected="unbiased",
            ),
        ),
    ]
    if g >= 2:
        specs += [
            (
                "group",
                EstimatorSpec("rloo", group_size=g, label=f"RLOO G={g}", expected="unbiased"),
            ),
            (
                "group",
                EstimatorSpec(
                    "remax",
                    group_size=g,
                    inputs=InputSpec(baseline="greedy"),
                    label=f"ReMax G={g}",
                    expected="unbiased",
                ),
            ),
            (
                "group",
                EstimatorSpec(
                    "grpo",
                    {"std_scaling": "none"},
                    group_size=g,
                    label=f"GRPO mean-only G={g}",
                    expected=f"scaled x{(g - 1) / g!r}",
                ),
            ),
            (
                "group",
                EstimatorSpec(
                    "grpo",
                    {"std_scaling": "group"},
                    group_size=g,
                    label=f"GRPO mean/std G={g}",
                    expected="biased",
                ),
            ),
        ]
    for k in rollouts:
        inp = InputSpec(prefix_values="mc", rollouts=k)
        specs.append(
            (
                "trepo",
                EstimatorSpec("trepo", inputs=inp, label=f"TRePO all K={k}", expected="unbiased"),
            )
        )
    for cols in ("pair", "state"):
        for m in anchors:
            inp = InputSpec(
                prefix_values="mc", rollouts=anchor_rollouts, anchors=m, anchor_columns=cols
            )
            label = f"TRePO m={m} K={anchor_rollouts}" + ("" if cols == "pair" else " (state)")
            specs.append(
                (
                    "trepo",
                    EstimatorSpec(
                        "trepo", inputs=inp, label=label, expected=_trepo_expected(inp, h)
                    ),
                )
            )
    lengths = model.tree.lengths.unique()
    # length re-weighting biases the direction only when the lengths differ
    per_token = f"scaled x{1 / int(lengths[0])!r}" if len(lengths) == 1 else "biased"
    if g >= 2:
        for mode in est.AGGREGATION_MODES:
            expected = {
                "seq-mean-token-sum": "unbiased",
                "seq-mean-token-sum-norm": f"scaled x{1 / h!r}",
            }.get(mode, per_token)
            specs.append(
                (
                    "aggregation",
                    EstimatorSpec(
                        "rloo",
                        group_size=g,
                        aggregation=mode,
                        label=f"RLOO {mode}",
                        expected=expected,
                    ),
                )
            )
    if extra:
        for name in est.ADVANTAGE_ESTIMATORS:
            if name not in BUILTIN_ADVANTAGES:
                specs.append(
                    ("registry", EstimatorSpec(name, group_size=max(g, 1), inputs=ALL_EXACT))
                )
    return specs


WEIGHTINGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("Lemma 1: gamma^(t-1) Q (4)", "lemma1", {}),
    ("Lemma 2: Q + c(s_t)", "lemma2", {}),
    ("Thm 1: E RM(W^(t+1)) (21)", "theorem1", {}),
    ("Thm 2: V(s_t+1) - V(s_t) (28)", "theorem2", {}),
)


def identity_rows(model: ExactModel, tol: float = 1e-8) -> list[IdentityRow]:
    """Identities that hold exactly on every tree (no estimator involved)."""
    tr = model.tree
    rows = []
    collected = (
        torch.cumsum(model.token_rewards * model.discounts, 1)
        - model.token_rewards * model.discounts
    )
    u_by_v = collected + model.discounts * model.V[tr.node_of]
    err = float((u_by_v - model.U[tr.node_of]).abs().masked_fill(~tr.mask, 0.0).max())
    rows.append(IdentityRow("U(s_t) = sum_{k<t} g^(k-1) r_k + g^(t-1) V(s_t)", err, err <= tol))
    w = model.weights("theorem2")
    tele = w.sum(1) - (model.rewards - model.prompt_value[tr.resp_prompt])
    err = float(tele.abs().max())
    rows.append(IdentityRow("telescoping: sum_t Thm2_t = RM(W) - V(prompt)", err, err <= tol))
    err = abs(float(model.prob.sum()) - 1.0)
    rows.append(IdentityRow("sum_W P(W) = 1", err, err <= tol))
    err = abs(float(model.prompt_value.mean()) - model.J)
    rows.append(IdentityRow("V(prompt) = J", err, err <= tol))
    return rows


def verify(
    *,
    gamma: float = 1.0,
    horizon: int = 4,
    group_size: int = 4,
    seed: int = 0,
    policy: str = "tabular",
    length_cap: str = "force-eos",
    mc_samples: int = 20_000,
    max_groups: int = 1_000_000,
    rollouts: Sequence[int] = (1, 4),
    anchors: Sequence[int] = (1, 2, 3),
    kl: bool = True,
    extra: bool = True,
    model: ExactModel | None = None,
    ref_policy: Any = None,
    tol: float = 1e-8,
    setup: str = "paper",
) -> VerifyReport:
    """Check every estimator against the exact ``grad J``; see the module docstring.

    Args:
        setup: ``"paper"`` (:func:`paper_setup`) or ``"echo"`` (:func:`echo_setup`, a
            two-turn tree with a random environment reply; ZRA rewards, so ``gamma = 1``).
        gamma: discount of the :func:`paper_setup` (ignored when ``model`` is given).
        horizon: most tokens per response of the set-up.
        length_cap: ``"force-eos"`` or ``"env"`` (:data:`~llm_mdp.theory.tree.LENGTH_CAPS`).
        seed: seed of the set-up's rewards and policy.
        policy: ``"tabular"``, ``"gpt2"`` or ``"llama"``.
        group_size: ``G`` of the group estimators and aggregation rows.
        mc_samples: Monte Carlo draws when a group enumeration would exceed
            ``max_groups`` ordered groups (or the estimator mixes groups).
        rollouts: ``K`` values of the all-positions TRePO rows; ``anchors``: ``m`` values
            of the interpolated rows (with ``K = 4``).
        kl: add the KL rows (reference: the same kind of policy with seed ``seed + 1``,
            or ``ref_policy``).
        extra: add every registered advantage estimator the toolkit does not know.
        tol: exact rows count as unbiased when ``max |E g - grad J| <= tol * max(1, |grad J|_inf)``.
    """
    start = time.perf_counter()
    if model is None:
        if setup not in SETUPS:
            raise ValueError(f"setup must be one of {SETUPS}, got {setup!r}")
        multi_turn = setup == "echo"
        if multi_turn:
            if gamma != 1.0:
                raise ValueError(
                    f"gamma={gamma} with the echo set-up: its reward is response-level (ZRA), "
                    "so gamma must be 1 (eq. (26))"
                )
            model = echo_setup(horizon=horizon, length_cap=length_cap, seed=seed, policy=policy)
        else:
            model = paper_setup(
                gamma=gamma, horizon=horizon, length_cap=length_cap, seed=seed, policy=policy
            )
        if kl and ref_policy is None:
            ref_policy = make_policy(policy, horizon, seed + 1, multi_turn=multi_turn)
        kind = policy
    else:
        kind = type(model.policy).__name__
    rows: list[EstimatorRow] = []
    for label, name, options in WEIGHTINGS:
        mom = model.moments_of_weights(model.weights(name, **options))
        rows.append(
            estimator_row(
                model,
                mom,
                section="per-token",
                estimator=label,
                registry=None,
                expected="unbiased",
                tol=tol,
            )
        )
    for section, spec in standard_specs(model, group_size, rollouts, anchors, extra=extra):
        mom = model.moments(spec, max_groups=max_groups, mc_samples=mc_samples, seed=seed)
        rows.append(
            estimator_row(
                model,
                mom,
                section=section,
                estimator=spec.display,
                registry=spec.name,
                expected=spec.expected,
                tol=tol,
            )
        )
    kl_part = kl_rows(model, ref_policy, tol=tol) if kl and ref_policy is not None else []
    tr = model.tree
    info = SetupInfo(
        policy=kind,
        num_params=model.num_params,
        length_cap=tr.length_cap,
        horizon=tr.horizon,
        gamma=model.gamma,
        group_size=group_size,
        seed=seed,
        num_responses=tr.num_responses,
        num_nodes=tr.num_nodes,
        J=model.J,
        grad_norm=float(model.grad_J.norm()),
        seconds=time.perf_counter() - start,
        setup=setup,
    )
    return VerifyReport(setup=info, identities=identity_rows(model, tol), rows=rows, kl=kl_part)


# ----------------------------------------------------------------------------- printing
