"""``verify``: every estimator of the paper against the exact gradient, as rows and a table.

:func:`verify` builds the paper-notes section 5 set-up (or takes an
:class:`~llm_mdp.theory.exact.ExactModel`), evaluates the theory weightings, every
registered advantage estimator (the built-ins in their paper configurations, any other
one generically), the aggregation modes and the KL estimators, and returns a
:class:`VerifyReport`. :func:`print_report` prints it (a ``rich`` table when available),
:func:`plot_bias_variance` draws bias against variance, :func:`verify_cli` is
``llm-mdp verify``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from llm_mdp import estimators as est

from .kl import KLRow, kl_rows
from .moments import ExactModel
from .setups import POLICY_KINDS, make_policy, paper_setup
from .specs import ALL_EXACT, EstimatorSpec, GradientMoments, InputSpec
from .tree import LENGTH_CAPS

__all__ = [
    "EstimatorRow",
    "IdentityRow",
    "SetupInfo",
    "VerifyReport",
    "estimator_row",
    "format_report",
    "identity_rows",
    "plot_bias_variance",
    "print_report",
    "standard_specs",
    "verify",
    "verify_cli",
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
) -> VerifyReport:
    """Check every estimator against the exact ``grad J``; see the module docstring.

    Args:
        gamma, horizon, length_cap, seed, policy: the :func:`paper_setup` (ignored when
            ``model`` is given). ``policy`` is ``"tabular"``, ``"gpt2"`` or ``"llama"``.
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
        model = paper_setup(
            gamma=gamma, horizon=horizon, length_cap=length_cap, seed=seed, policy=policy
        )
        if kl and ref_policy is None:
            ref_policy = make_policy(policy, horizon, seed + 1)
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
    setup = SetupInfo(
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
    )
    return VerifyReport(setup=setup, identities=identity_rows(model, tol), rows=rows, kl=kl_part)


# ----------------------------------------------------------------------------- printing


def _fmt_err(x: float) -> str:
    return f"{x:.1e}"


def _mark(passed: bool | None) -> str:
    return {True: "ok", False: "FAIL", None: "-"}[passed]


def _tables(report: VerifyReport) -> tuple[str, list[tuple[str, list[str], list[list[str]]]]]:
    s = report.setup
    title = (
        f"llm-mdp verify: {s.policy} policy ({s.num_params} parameters), {s.num_responses} "
        f"responses ({s.length_cap}, H={s.horizon}), gamma={s.gamma}, G={s.group_size}, "
        f"seed={s.seed}: J={s.J:.6f}, |grad J|={s.grad_norm:.4f}, {s.seconds:.1f} s"
    )
    tables = []
    tables.append(
        (
            "Exact identities",
            ["identity", "max |error|", "check"],
            [[r.identity, _fmt_err(r.max_abs_error), _mark(r.passed)] for r in report.identities],
        )
    )
    head = ["section", "estimator", "expected", "method", "max|E g - grad J|", "cosine",
            "projection", "tr Cov (draw)", "tr Cov / resp", "check"]  # fmt: skip
    body = []
    for r in report.rows:
        method = r.method
        if r.method == "monte-carlo":
            method = f"mc n={r.num_draws} z={r.z_max:.1f}"
        elif r.method == "enumerated":
            method = f"{r.num_draws} " + ("groups" if r.n_responses > 1 else "responses")
        body.append(
            [
                r.section,
                r.estimator,
                r.expected.replace("scaled x", "x"),
                method,
                _fmt_err(r.max_abs_error),
                f"{r.cosine:.4f}",
                f"{r.projection:.4f}",
                f"{r.trace_cov:.4f}",
                f"{r.trace_cov_per_response:.4f}",
                _mark(r.passed),
            ]
        )
    tables.append(("Gradient estimators vs exact grad J", head, body))
    if report.kl:
        kl_head = ["estimator", "placement", "E sum_t k", "exact KL", "value error",
                   "max|E g - grad KL|", "cosine", "projection", "expected", "check"]  # fmt: skip
        kl_body = [
            [
                r.estimator,
                r.placement,
                f"{r.expected_value:.6f}",
                f"{r.exact_kl:.6f}",
                _fmt_err(r.value_error),
                _fmt_err(r.grad_max_abs_error),
                f"{r.grad_cosine:.4f}",
                f"{r.grad_projection:.4f}",
                r.expected,
                _mark(r.passed),
            ]
            for r in report.kl
        ]
        tables.append(("KL(pi || pi_ref) estimators", kl_head, kl_body))
    return title, tables


def format_report(report: VerifyReport, width: int | None = None) -> str:
    """Plain-text rendering of the report, lines at most ``width`` characters (``None``:
    no limit). A table wider than that is cut into column groups that repeat its leading
    (name) columns; a line can exceed ``width`` only when the name columns and one more
    do."""
    title, tables = _tables(report)
    out = [title] if width is None else textwrap.wrap(title, width)
    for name, head, body in tables:
        widths = [
            max(len(h), *(len(row[i]) for row in body)) if body else len(h)
            for i, h in enumerate(head)
        ]
        groups = _column_groups(widths, width, keep=_key_columns(head))
        for k, cols in enumerate(groups):
            out.append("")
            out.append(name if len(groups) == 1 else f"{name} ({k + 1}/{len(groups)})")
            out.append("  ".join(head[i].ljust(widths[i]) for i in cols).rstrip())
            out.append("  ".join("-" * widths[i] for i in cols))
            out.extend("  ".join(row[i].ljust(widths[i]) for i in cols).rstrip() for row in body)
    out.append("")
    out.append("all checks passed" if report.passed else "SOME CHECKS FAILED")
    return "\n".join(out)


def _key_columns(head: Sequence[str]) -> int:
    """How many leading columns name a row (repeated in every column group)."""
    return 2 if len(head) > 1 and head[1] in ("estimator", "placement") else 1


def _column_groups(widths: Sequence[int], width: int | None, keep: int) -> list[list[int]]:
    """Split column indices into groups whose joined width (2 spaces apart) fits ``width``;
    each group starts with the first ``keep`` columns."""
    every = list(range(len(widths)))
    if width is None or sum(widths) + 2 * (len(widths) - 1) <= width:
        return [every]
    groups: list[list[int]] = []
    current = every[:keep]
    for i in every[keep:]:
        if len(current) > keep and sum(widths[j] + 2 for j in current) + widths[i] > width:
            groups.append(current)
            current = every[:keep]
        current = [*current, i]
    groups.append(current)
    return groups


def output_width(stream: TextIO) -> int | None:
    """The width to fit output to: the terminal's (or ``$COLUMNS``) when ``stream`` is a
    terminal or ``COLUMNS`` is set, else ``None`` (a file or pipe: no limit)."""
    isatty = getattr(stream, "isatty", None)
    if (callable(isatty) and isatty()) or "COLUMNS" in os.environ:
        return shutil.get_terminal_size().columns
    return None


def print_report(
    report: VerifyReport,
    file: TextIO | None = None,
    *,
    plain: bool = False,
    width: int | None = None,
) -> None:
    """Print the report: a ``rich`` table when ``rich`` is importable, else plain text.

    Lines fit ``width`` (default: :func:`output_width` of the stream, so a terminal's
    width; no limit for a file or pipe).
    """
    stream = file if file is not None else sys.stdout
    width = width if width is not None else output_width(stream)
    try:
        if plain:
            raise ImportError
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        print(format_report(report, width), file=stream)
        return
    console = Console(file=stream, width=width or 1000)  # a file: a width no table reaches
    title, tables = _tables(report)
    console.print(title)
    for name, head, body in tables:
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
        # a rich column takes its text + 3 (padding, rule); cut into groups, never squeeze
        # numbers into "0.10…"
        limit = None if width is None else width - 3
        groups = _column_groups([w + 1 for w in widths], limit, keep=_key_columns(head))
        for k, cols in enumerate(groups):
            label = name if len(groups) == 1 else f"{name} ({k + 1}/{len(groups)})"
            table = Table(title=label, title_justify="left")
            for i in cols:
                left = head[i] in ("section", "estimator", "identity")
                table.add_column(head[i], justify="left" if left else "right")
            for row in body:
                style = "red" if row[-1] == "FAIL" else None
                table.add_row(*(escape(row[i]) for i in cols), style=style)
            console.print(table)
    console.print("all checks passed" if report.passed else "[red]SOME CHECKS FAILED[/red]")


# ----------------------------------------------------------------------------- plotting


def plot_bias_variance(rows: Sequence[EstimatorRow] | VerifyReport, path: str | Path) -> Path:
    """Save a PNG: relative bias ``|E g - grad J| / |grad J|`` against ``tr Cov`` per response.

    One labelled point per estimator row (``rows`` or a :class:`VerifyReport`); the y axis
    is linear below ``1e-4`` so the unbiased estimators (bias ~1e-16) sit on the zero
    line, the x axis logarithmic. Labels are nudged apart so that they stay readable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = rows.rows if isinstance(rows, VerifyReport) else list(rows)
    colors = {"per-token": "tab:blue", "group": "tab:orange", "trepo": "tab:green",
              "aggregation": "tab:purple", "registry": "tab:gray"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(12, 7.5))
    points = []
    seen: set[str] = set()
    for r in items:
        x = max(r.trace_cov_per_response, 1e-12)
        y = r.relative_error if math.isfinite(r.relative_error) else 0.0
        c = colors.get(r.section, "black")
        ax.scatter(x, y, color=c, s=28, label=None if r.section in seen else r.section, zorder=3)
        seen.add(r.section)
        points.append((x, y, r.estimator))
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_ylim(-2e-5, 3.0)
    ax.autoscale_view()
    fig.canvas.draw()
    placed: list[tuple[float, float, float, float]] = []
    for x, y, text in sorted(points, key=lambda p: (p[1], p[0])):
        px, py = ax.transData.transform((x, y))
        w, h = 5.8 * len(text), 10.0
        dy = 4.0
        while any(
            px + 4 < bx + bw and bx < px + 4 + w and py + dy < by + bh and by < py + dy + h
            for bx, by, bw, bh in placed
        ):
            dy += h
        placed.append((px + 4, py + dy, w, h))
        ax.annotate(text, (x, y), fontsize=7, xytext=(4, dy * 72 / fig.dpi),
                    textcoords="offset points",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6"} if dy > 4 else None)  # fmt: skip
    ax.set_xlabel("trace of the covariance of the gradient, per response (log)")
    ax.set_ylabel("relative bias |E g - grad J| / |grad J| (linear below 1e-4)")
    ax.set_title("Policy-gradient estimators: exact bias vs variance")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-mdp verify",
        description="Check every policy-gradient estimator against the exact gradient of a "
        "small policy (paper-notes section 5 set-up).",
    )
    p.add_argument("--gamma", type=float, default=1.0, help="discount in (0, 1] (default 1)")
    p.add_argument("--horizon", type=int, default=4, help="most tokens per response (default 4)")
    p.add_argument("--length-cap", choices=LENGTH_CAPS, default="force-eos",
                   help="force-eos: every response ends with EOS within H tokens (15 "
                        "responses for H=4, the notes' set-up); env: the env's rule, a capped "
                        "response has no EOS (31)")  # fmt: skip
    p.add_argument(
        "--group-size", type=int, default=4, help="G of the group estimators (default 4)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of rewards and policy (default 0)")
    p.add_argument(
        "--policy", choices=POLICY_KINDS, default="tabular", help="policy (default tabular)"
    )
    p.add_argument("--mc-samples", type=int, default=20_000,
                   help="Monte Carlo draws where groups are too many to enumerate (default 20000)")  # fmt: skip
    p.add_argument("--max-groups", type=int, default=1_000_000,
                   help="enumerate up to this many ordered groups (default 1000000)")  # fmt: skip
    p.add_argument("--no-kl", action="store_true", help="skip the KL rows")
    p.add_argument(
        "--off-policy",
        action="store_true",
        help="the off-policy section instead (llm-mdp verify --off-policy --help)",
    )
    p.add_argument("--plot", metavar="PATH", help="save the bias/variance plot (PNG)")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument(
        "--plain", action="store_true", help="plain-text table even when rich is installed"
    )
    return p


def verify_cli(argv: list[str] | None = None) -> int:
    """``llm-mdp verify``: print the table; 0 when every check passed, 1 otherwise, 2 on bad input."""
    if argv and "--off-policy" in argv:  # its own section: llm_mdp.theory.offpolicy_report
        from .offpolicy_report import offpolicy_cli

        return offpolicy_cli([a for a in argv if a != "--off-policy"])
    args = _parser().parse_args(argv)
    try:
        if not 0.0 < args.gamma <= 1.0:
            raise ValueError(f"--gamma must be in (0, 1], got {args.gamma}")
        if args.group_size < 1:
            raise ValueError(f"--group-size must be >= 1, got {args.group_size}")
        if args.mc_samples < 2:
            raise ValueError(f"--mc-samples must be >= 2, got {args.mc_samples}")
        report = verify(
            gamma=args.gamma,
            horizon=args.horizon,
            length_cap=args.length_cap,
            group_size=args.group_size,
            seed=args.seed,
            policy=args.policy,
            mc_samples=args.mc_samples,
            max_groups=args.max_groups,
            kl=not args.no_kl,
        )
    except ValueError as err:
        print(f"llm-mdp verify: error: {err}", file=sys.stderr)
        return 2
    print_report(report, plain=args.plain)
    if args.plot:
        print(f"plot: {plot_bias_variance(report, args.plot)}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_dict(), indent=2))
        print(f"json: {path}")
    return 0 if report.passed else 1
