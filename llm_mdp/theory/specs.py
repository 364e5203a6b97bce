"""What the exact toolkit evaluates: estimator specs, their inputs, and the moments it returns.

* :class:`InputSpec`: which optional :class:`~llm_mdp.estimators.AdvantageInputs` the
  toolkit fills, exactly or by TRePO's Monte Carlo (``docs/theory.md#trepo``);
* :class:`EstimatorSpec`: a registered estimator, its options, group size and aggregation;
* :class:`GradientMoments` and :class:`Comparison`: the result, against ``grad J``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llm_mdp.anchors import ANCHOR_COLUMNS, VALUE_ESTIMATES

__all__ = [
    "ALL_EXACT",
    "F64",
    "Comparison",
    "EstimatorSpec",
    "GradientMoments",
    "InputSpec",
    "ResponseRewardFn",
    "TokenRewardFn",
    "compare",
]

F64 = torch.float64

TokenRewardFn = Callable[[tuple[int, ...], tuple[int, ...], int], float]
"""``r(prompt, prefix, token)``: the true reward of emitting ``token`` after ``prefix``."""
ResponseRewardFn = Callable[[tuple[int, ...], tuple[int, ...]], float]
"""``RM(prompt, response)``: a response-level reward (Zero-Reward Assumption set-up)."""


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class InputSpec:
    """Which optional :class:`~llm_mdp.estimators.AdvantageInputs` fields to fill, and how.

    Attributes:
        baseline: ``None``; ``"greedy"``: the reward of the exact greedy response to the
            prompt (ReMax); ``"value"``: the exact ``V(prompt)`` (REINFORCE + baseline).
        token_rewards: ``None``; ``"true"``: the true token rewards ``r_t``; ``"zra"``:
            ``RM(W)`` on the last token (:func:`~llm_mdp.estimators.zra_token_rewards`).
        values: ``None``; ``"exact"``: the exact ``V(s_t)`` of the chosen token rewards and
            ``gamma`` (a perfect critic); ``"zero"``: no critic.
        prefix_values: ``None``; ``"exact"``: exact ``U(s_t)`` at every position, all known;
            ``"mc"``: TRePO's Monte Carlo estimates (``docs/theory.md#trepo``, the plan
            of :func:`~llm_mdp.anchors.anchor_plan` that :class:`~llm_mdp.agents.trepo.TRePO`
            rolls out): the mean ``RM`` of
            ``rollouts`` fresh completions of the prefix, at the anchors' columns.
        rollouts: ``K``, completions per estimated value (``prefix_values="mc"``).
        anchors: ``m`` anchor positions drawn uniformly without replacement from ``1..T``
            (all when ``m >= T``); ``None``: every position (the unbiased all-positions
            estimator).
        anchor_columns: ``"pair"`` (default, option 2 of ``docs/theory.md#trepo``, the agent): an anchor
            ``t`` estimates ``V(s_t)`` and ``V(s_{t+1})``; ``"state"``: ``V(s_t)`` only.
        value_estimates: ``"shared"`` (adjacent anchors reuse one estimate per prefix) or
            ``"fresh"`` (``V(s_{t+1})`` of an anchor gets its own rollouts, passed as
            ``next_values``), as the agent's option of the same name.
        root_rollouts: completions behind ``V_hat(s_1)``, always estimated (option 2);
            ``None`` means ``rollouts``. The agent uses the leave-one-out mean of the
            ``G - 1`` other responses of the group, which for one response has the law of
            ``root_rollouts = G - 1``.
    """

    baseline: str | None = None
    token_rewards: str | None = None
    values: str | None = None
    prefix_values: str | None = None
    rollouts: int = 1
    anchors: int | None = None
    anchor_columns: str = "pair"
    value_estimates: str = "shared"
    root_rollouts: int | None = None

    def __post_init__(self) -> None:
        allowed: dict[str, tuple[str | None, ...]] = {
            "baseline": (None, "greedy", "value"),
            "token_rewards": (None, "true", "zra"),
            "values": (None, "exact", "zero"),
            "prefix_values": (None, "exact", "mc"),
            "anchor_columns": ANCHOR_COLUMNS,
            "value_estimates": VALUE_ESTIMATES,
        }
        for name, options in allowed.items():
            if getattr(self, name) not in options:
                raise ValueError(
                    f"InputSpec.{name} must be one of {options}, got {getattr(self, name)!r}"
                )
        if self.rollouts < 1:
            raise ValueError(f"InputSpec.rollouts must be >= 1, got {self.rollouts}")
        if self.root_rollouts is not None and self.root_rollouts < 1:
            raise ValueError(f"InputSpec.root_rollouts must be >= 1, got {self.root_rollouts}")
        if self.anchors is not None and self.anchors < 1:
            raise ValueError(f"InputSpec.anchors must be >= 1 or None, got {self.anchors}")
        if self.values is not None and self.token_rewards is None:
            raise ValueError("InputSpec.values needs token_rewards ('true' or 'zra')")


ALL_EXACT = InputSpec(baseline="greedy", token_rewards="zra", values="exact", prefix_values="exact")
"""Every optional input, exact: the default for estimators the toolkit knows nothing about."""


@dataclass(frozen=True)
class EstimatorSpec:
    """A registered advantage estimator plus everything needed to evaluate it.

    Attributes:
        name: key in :data:`llm_mdp.estimators.ADVANTAGE_ESTIMATORS`.
        options: keyword options of the estimator (e.g. ``{"std_scaling": "none"}``).
        group_size: ``G`` responses per draw (one prompt).
        inputs: which optional inputs to fill (:class:`InputSpec`).
        aggregation: an :data:`~llm_mdp.estimators.AGGREGATION_MODES` name; the draw's
            gradient is ``grad aggregate(A * logp, mask, aggregation)``.
        label: display name (default: ``name`` and options).
        expected: what theory predicts: ``"unbiased"``, ``"scaled"`` (by
            ``expected_scale``), ``"biased"`` or ``"?"``.
        expected_scale: ``E g = expected_scale * grad J`` when ``expected == "scaled"``.
        group_local: the estimator is a function of each group alone (true for every
            built-in except ``grpo`` with ``std_scaling="batch"``), so many groups can be
            evaluated in one call. ``None``: test it numerically.
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    group_size: int = 1
    inputs: InputSpec = field(default_factory=InputSpec)
    aggregation: str = "seq-mean-token-sum"
    label: str = ""
    expected: str = "?"
    expected_scale: float | None = None
    group_local: bool | None = None

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}({opts})" if opts else self.name


@dataclass(frozen=True, eq=False)
class GradientMoments:
    """Mean and covariance of one draw's gradient estimate ``g = S^T a``.

    Attributes:
        mean: ``(P,)`` ``E g`` (exact, or the Monte Carlo mean).
        trace_cov: ``tr Cov g`` of one draw (a draw = ``n_responses`` responses).
        n_responses: responses per draw (``G`` for group estimators, else 1).
        method: ``"exact"``, ``"enumerated"`` (every ordered group) or ``"monte-carlo"``.
        num_draws: groups enumerated or Monte Carlo samples (``None`` for closed forms).
        stderr: ``(P,)`` Monte Carlo standard error of ``mean`` (``None`` when exact).
        pair_mean: ``(n_pairs,)`` ``E a``.
        pair_cov: ``(n_pairs, n_pairs)`` ``Cov a``.
    """

    mean: Tensor
    trace_cov: float
    n_responses: int
    method: str
    num_draws: int | None
    stderr: Tensor | None
    pair_mean: Tensor
    pair_cov: Tensor


@dataclass(frozen=True)
class Comparison:
    """An expected gradient against the true one.

    Attributes:
        max_abs_error: ``max |E g - grad J|``.
        relative_error: ``|E g - grad J| / |grad J|`` (Euclidean norms).
        cosine: cosine of ``E g`` and ``grad J``.
        projection: ``<E g, grad J> / |grad J|^2`` (1 when unbiased, ``(G-1)/G`` for GRPO
            mean-only).
        z_max: Monte Carlo only: ``max |E g - grad J| / stderr`` over components with a
            positive standard error (a z-test; about 4 or less when unbiased).
    """

    max_abs_error: float
    relative_error: float
    cosine: float
    projection: float
    z_max: float | None = None


def compare(mean: Tensor, target: Tensor, stderr: Tensor | None = None) -> Comparison:
    """Compare an expected gradient ``mean`` with ``target`` (both ``(P,)``)."""
    diff = mean - target
    tn = float(target.norm())
    mn = float(mean.norm())
    dot = float(mean @ target)
    z = None
    if stderr is not None:
        ok = stderr > 1e-12 * max(1.0, float(target.abs().max()))
        z = float((diff[ok].abs() / stderr[ok]).max()) if bool(ok.any()) else 0.0
    return Comparison(
        max_abs_error=float(diff.abs().max()),
        relative_error=float(diff.norm()) / tn if tn > 0 else math.inf,
        # a zero expectation (e.g. k1 in the loss) has no direction: cosine 0
        cosine=dot / (mn * tn) if mn > 1e-12 * tn and tn > 0 else 0.0,
        projection=dot / tn**2 if tn > 0 else math.inf,
        z_max=z,
    )
