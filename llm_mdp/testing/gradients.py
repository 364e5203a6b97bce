"""Bias and variance of an advantage estimator against the exact ``grad J``; assertions.

The estimator is a plain function with the registry's signature (see
:mod:`llm_mdp.testing`, section "What you pass") or a registry name. On the small MDP
every group of ``G`` responses is enumerated (or, for estimators that mix groups,
sampled with standard errors), so ``E g`` is exact: "unbiased" means equal to ``grad J``
to float precision, not "within noise".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from llm_mdp.theory import ALL_EXACT, EstimatorSpec, ExactModel, InputSpec

from ._format import coordinate_namer, describe_mdp, fmt, worst_coordinates
from ._registry import display_name, registered_advantage
from .mdps import small_mdp

__all__ = [
    "AdvantageEstimator",
    "GradientReport",
    "assert_biased",
    "assert_unbiased",
    "gradient_report",
]

AdvantageEstimator = Callable[..., Tensor]
"""``fn(batch: AdvantageInputs, **options) -> Tensor (B, R)`` (see :mod:`llm_mdp.testing`)."""

Z_CRIT = 5.0
"""Monte Carlo: a component counts as equal when within ``Z_CRIT`` standard errors."""


@dataclass(frozen=True, eq=False)
class GradientReport:
    """One estimator's expected gradient and variance against the exact ``grad J``.

    Attributes:
        estimator: display name. ``group_size``: ``G`` responses per draw (one prompt).
        aggregation: the loss reduction (an :data:`~llm_mdp.estimators.AGGREGATION_MODES`
            name); a draw's gradient is ``grad aggregate(A * logp, mask, aggregation)``.
        method: ``"exact"`` / ``"enumerated"`` (every group of ``G``, exact) or
            ``"monte-carlo"`` (``num_draws`` seeded draws, ``stderr`` set).
        mean: ``(P,)`` ``E g``. ``grad_J``: ``(P,)`` the exact gradient.
        stderr: ``(P,)`` Monte Carlo standard error of ``mean`` (``None`` when exact).
        max_abs_error: ``max |E g - grad J|``. ``relative_error``: ``|E g - grad J| / |grad J|``.
        cosine: cosine of ``E g`` and ``grad J`` (1: right direction).
        projection: ``<E g, grad J> / |grad J|^2``, the projection ratio (1 when unbiased,
            ``(G-1)/G`` for a mean baseline that includes the sample).
        trace_cov: variance, the trace of the covariance of one draw's gradient.
        z_max: Monte Carlo only: ``max |E g - grad J| / stderr``.
        hints: what the numbers look like (see :func:`assert_unbiased`).
        mdp: the one-line description of the MDP.
    """

    estimator: str
    group_size: int
    aggregation: str
    method: str
    num_draws: int | None
    mean: Tensor
    grad_J: Tensor
    stderr: Tensor | None
    max_abs_error: float
    relative_error: float
    cosine: float
    projection: float
    trace_cov: float
    z_max: float | None
    hints: tuple[str, ...]
    mdp: str
    _namer: Callable[[int], str] = field(repr=False)

    @classmethod
    def from_moments(
        cls,
        model: Any,
        mom: Any,
        cmp: Any,
        *,
        estimator: str,
        group_size: int,
        aggregation: str,
        hints: Sequence[str],
    ) -> GradientReport:
        """The report of moments ``mom`` of ``model`` compared (``cmp``) with ``grad J``."""
        return cls(
            estimator=estimator,
            group_size=group_size,
            aggregation=aggregation,
            method=mom.method,
            num_draws=mom.num_draws,
            mean=mom.mean,
            grad_J=model.grad_J,
            stderr=mom.stderr,
            max_abs_error=cmp.max_abs_error,
            relative_error=cmp.relative_error,
            cosine=cmp.cosine,
            projection=cmp.projection,
            trace_cov=mom.trace_cov,
            z_max=cmp.z_max,
            hints=tuple(hints),
            mdp=describe_mdp(model),
            _namer=coordinate_namer(model),
        )

    @property
    def bias(self) -> Tensor:
        """``E g - grad J``, ``(P,)``."""
        return self.mean - self.grad_J

    @property
    def bias_norm(self) -> float:
        """``|E g - grad J|`` (Euclidean)."""
        return float(self.bias.norm())

    @property
    def variance(self) -> float:
        """Alias of ``trace_cov``: the trace of the covariance of one draw's gradient."""
        return self.trace_cov

    @property
    def trace_cov_per_response(self) -> float:
        """``trace_cov * group_size``: comparable across group sizes."""
        return self.trace_cov * self.group_size

    @property
    def is_exact(self) -> bool:
        return self.method != "monte-carlo"

    def coordinate(self, index: int) -> str:
        """The parameter name of gradient coordinate ``index`` (e.g. ``logits[1, 3] (...)``)."""
        return self._namer(index)

    def summary(self) -> str:
        how = self.method if self.num_draws is None else f"{self.method}, {self.num_draws} draws"
        lines = [
            f"{self.estimator} (G={self.group_size}, {self.aggregation}; {how}) on {self.mdp}:",
            f"  |E g - grad J| = {fmt(self.bias_norm)} (max {fmt(self.max_abs_error)}), "
            f"relative {fmt(self.relative_error)}, cosine {self.cosine:.6f}, "
            f"projection ratio {self.projection:.6f}, variance (tr Cov) {fmt(self.trace_cov)}",
        ]
        if self.z_max is not None:
            lines.append(f"  Monte Carlo z_max {self.z_max:.2f}")
        lines += [f"  HINT: {h}" for h in self.hints]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ----------------------------------------------------------------------------- report


def _inputs(inputs: InputSpec | Mapping[str, Any] | None) -> InputSpec:
    if inputs is None:
        return ALL_EXACT
    if isinstance(inputs, InputSpec):
        return inputs
    return InputSpec(**dict(inputs))


def gradient_report(
    estimator: str | AdvantageEstimator,
    mdp: ExactModel | None = None,
    *,
    group_size: int = 1,
    options: Mapping[str, Any] | None = None,
    inputs: InputSpec | Mapping[str, Any] | None = None,
    aggregation: str = "seq-mean-token-sum",
    method: str = "auto",
    mc_samples: int = 20_000,
    seed: int = 0,
    name: str | None = None,
) -> GradientReport:
    """Exact bias, cosine, projection ratio and variance of an advantage estimator.

    Args:
        estimator: ``fn(batch: AdvantageInputs, **options) -> (B, R)`` or a registry name.
        mdp: an :class:`~llm_mdp.theory.ExactModel`, e.g. from :func:`small_mdp` or the
            ``exact_mdp`` fixture; default ``small_mdp()`` (tabular, per-token rewards).
        group_size: ``G`` responses per prompt in one call (contiguous groups).
        options: keyword options passed to the estimator.
        inputs: which optional :class:`~llm_mdp.estimators.AdvantageInputs` fields are
            filled (an :class:`~llm_mdp.theory.InputSpec` or its fields as a dict). Default
            :data:`~llm_mdp.theory.ALL_EXACT`: every field, exact (``baseline`` = the
            greedy response's reward, ``token_rewards`` by ZRA, ``values`` the exact
            ``V(s_t)``, ``prefix_values`` the exact ``V(s_t)`` of every prefix). TRePO's
            Monte Carlo values: ``{"prefix_values": "mc", "rollouts": K, "anchors": m}``.
        aggregation: the loss reduction of a draw (default: sum over tokens, mean over
            sequences, the unbiased one).
        method: ``"auto"`` (enumerate every group when cheap and the estimator treats
            groups separately, else Monte Carlo; Monte Carlo too when an estimator of
            TRePO's sampled values is not affine in them to 1e-9, e.g. computed in
            float32), ``"exact"`` or ``"mc"``.
        mc_samples: Monte Carlo draws.
        seed: seed of the Monte Carlo draws.
        name: display name (default: the function's name).
    """
    model = small_mdp() if mdp is None else mdp
    label = name or display_name(estimator)
    with registered_advantage(estimator) as key:
        spec = EstimatorSpec(
            key,
            dict(options or {}),
            group_size=group_size,
            inputs=_inputs(inputs),
            aggregation=aggregation,
            label=label,
        )
        try:
            mom = model.moments(spec, method=method, mc_samples=mc_samples, seed=seed)
        except ValueError as err:  # TRePO's closed form needs an affine estimator (float64)
            if method != "auto" or "not affine" not in str(err):
                raise
            mom = model.moments(spec, method="mc", mc_samples=mc_samples, seed=seed)
    cmp = model.compare(mom)
    exact = mom.method != "monte-carlo"
    ratio = float(mom.mean.norm()) / max(float(model.grad_J.norm()), 1e-300)
    hints = shape_hints(
        cmp.cosine, cmp.projection, ratio, group_size, model.tree.horizon, exact=exact
    )
    return GradientReport.from_moments(
        model,
        mom,
        cmp,
        estimator=label,
        group_size=group_size,
        aggregation=aggregation,
        hints=hints,
    )


# ----------------------------------------------------------------------------- hints


def _near(x: float, target: float, tol: float) -> bool:
    return abs(x - target) <= tol * max(1.0, abs(target))


def shape_hints(
    cosine: float, projection: float, norm_ratio: float, g: int, horizon: int, *, exact: bool
) -> list[str]:
    """Hints from the geometry of ``E g`` against ``grad J`` (cosine, projection, norms).

    ``norm_ratio = |E g| / |grad J|``. Nothing when ``E g`` is ``grad J``.
    """
    tight = 1e-6 if exact else 0.03
    if not math.isfinite(projection):
        return []
    if norm_ratio < tight:
        return [
            "E g = 0: the weight of every token has zero mean given its state, so nothing is "
            "learned; e.g. the sample's own reward subtracted from itself (baseline = R_i), "
            "advantages that are 0 or constant, or a gradient that does not reach logp"
        ]
    if _near(cosine, 1.0, tight) and _near(projection, 1.0, tight):
        return []
    hints: list[str] = []
    s = abs(projection)
    scales: list[tuple[float, str]] = []
    if g >= 2:
        scales += [
            (
                (g - 1) / g,
                f"looks like a (G-1)/G = {(g - 1) / g:.4g} scaling: a mean baseline that includes "
                "the sample itself (R_i - mean_j R_j over all G, as GRPO without std / Dr. GRPO); "
                "the leave-one-out mean R_i - mean_{j != i} R_j (RLOO) is unbiased; if intended, "
                "pin it with assert_biased(expected_scale=(G-1)/G)",
            ),
            (
                1.0 / g,
                f"looks like a 1/G = {1 / g:.4g} scaling: the loss divided by G once too often "
                "(a mean over the group on top of the mean over sequences?)",
            ),
            (
                float(g),
                f"looks like a G = {g} scaling: summed over the group's responses instead of "
                "averaged",
            ),
        ]
    scales.append(
        (
            1.0 / horizon,
            f"looks like a 1/max_len = 1/{horizon} scaling: normalised by the length cap "
            "(seq-mean-token-sum-norm, Dr. GRPO's constant): a fixed learning-rate factor",
        )
    )
    if _near(abs(cosine), 1.0, tight):
        if cosine < 0:
            what = "exactly -grad J" if _near(s, 1.0, tight) else f"{projection:.6g} x grad J"
            hints.append(
                f"sign flip: cosine -1, E g = {what}; the loss to minimise is -A * logp "
                "(maximise A * logp), and the advantage is R - baseline, not baseline - R"
            )
        matched = [text for value, text in scales if _near(s, value, tight)]
        if matched:
            hints += matched
        elif not _near(s, 1.0, tight):
            hints.append(
                f"right direction, scaled by {s:.6g}: a constant normalisation (acts as a "
                f"learning-rate factor); if intended, pin it with assert_biased(expected_scale={s:.6g})"
            )
        return hints
    if cosine > 0:
        hints.append(
            f"biased in direction (cosine {cosine:.6f}, projection ratio {projection:.6f}): the "
            "weights re-weight responses or positions; usual causes: a std normalisation "
            "(GRPO), a per-sequence token mean or token-mean loss (length re-weighting), "
            "interpolated or partial value estimates (TRePO with few anchors), a baseline "
            "that depends on the sampled token, or gamma < 1 with response-level rewards (eq. 26)"
        )
    else:
        hints.append(
            f"E g points away from grad J (cosine {cosine:.6f}): a sign error in part of the "
            "weight, or a baseline that depends on the sampled action"
        )
    return hints


def _suspects(model: ExactModel, g: int, aggregation: str) -> list[tuple[str, EstimatorSpec]]:
    """Known-biased estimators whose ``E g`` a failing estimator may equal exactly."""
    out: list[tuple[str, EstimatorSpec]] = []
    base = EstimatorSpec("rloo", group_size=g) if g >= 2 else EstimatorSpec("reinforce")
    base_name = "RLOO" if g >= 2 else "REINFORCE"
    if g >= 2:
        out.append(
            (
                "GRPO's std normalisation (R_i - mean_j R_j) / (std_j + eps), a per-group "
                "learning rate",
                EstimatorSpec("grpo", {"std_scaling": "group"}, g, aggregation=aggregation),
            )
        )
    if aggregation == "seq-mean-token-sum":
        out.append(
            (
                f"{base_name} divided by the response length (a per-sequence token mean, "
                "original GRPO's loss): shorter responses weigh more",
                EstimatorSpec(base.name, group_size=g, aggregation="seq-mean-token-mean"),
            )
        )
        out.append(
            (
                f"{base_name} under a token-mean loss (DAPO / TRL default): re-weights "
                "responses by length",
                EstimatorSpec(base.name, group_size=g, aggregation="token-mean"),
            )
        )
    if model.gamma < 1.0:
        out.append(
            (
                "a response-level reward discounted from the end, gamma^(T-t) RM(W) (ZRA with "
                "gamma < 1, eq. (26): under ZRA use gamma = 1)",
                EstimatorSpec(
                    "gae",
                    {"lam": 1.0},
                    inputs=InputSpec(token_rewards="zra", values="zero"),
                    aggregation=aggregation,
                ),
            )
        )
    return out


def suspect_hints(model: ExactModel, report: GradientReport) -> list[str]:
    """``E g`` equal (to 1e-6 relative) to that of a known-biased estimator: name it."""
    if not report.is_exact:
        return []
    scale = max(float(report.grad_J.abs().max()), 1e-300)
    hints = []
    for label, spec in _suspects(model, report.group_size, report.aggregation):
        try:
            other = model.moments(spec, method="exact")
        except ValueError:
            continue
        if float((other.mean - report.mean).abs().max()) <= 1e-6 * scale:
            hints.append(f"E g equals exactly that of {label}")
    return hints


# ----------------------------------------------------------------------------- asserts


def _allowed(target: Tensor, stderr: Tensor | None, rtol: float, atol: float) -> Tensor:
    allowed = atol + rtol * target.abs()
    if stderr is not None:
        allowed = allowed + Z_CRIT * stderr
    return allowed


def _failure(
    title: str,
    report: GradientReport,
    target: Tensor,
    target_label: str,
    allowed: Tensor,
    rtol: float,
    atol: float,
    hints: list[str],
) -> str:
    n_bad, lines = worst_coordinates(
        report.mean, target, allowed, report.coordinate, target_label=target_label
    )
    how = (
        report.method if report.num_draws is None else f"{report.method}, {report.num_draws} draws"
    )
    tol = f"rtol={rtol:g}, atol={atol:g}" + (
        f", + {Z_CRIT:g} standard errors" if report.stderr is not None else ""
    )
    msg = [
        f"{title}: {report.estimator} (G={report.group_size}, {report.aggregation}; {how})",
        f"  on {report.mdp}",
        f"  E[g] differs from {target_label} on {n_bad} of {len(target)} coordinates "
        f"({tol}); worst:",
        *lines,
        f"  |E g - grad J| / |grad J| = {fmt(report.relative_error)}, cosine {report.cosine:.6f}, "
        f"projection ratio {report.projection:.6f}, variance (tr Cov) {fmt(report.trace_cov)}",
    ]
    msg += [f"  HINT: {h}" for h in hints]
    return "\n".join(msg)


def assert_unbiased(
    estimator: str | AdvantageEstimator,
    mdp: ExactModel | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    group_size: int = 1,
    options: Mapping[str, Any] | None = None,
    inputs: InputSpec | Mapping[str, Any] | None = None,
    aggregation: str = "seq-mean-token-sum",
    method: str = "auto",
    mc_samples: int = 20_000,
    seed: int = 0,
    name: str | None = None,
) -> GradientReport:
    """Assert ``E g = grad J`` exactly: ``|E g - grad J| <= atol + rtol * |grad J|`` per coordinate.

    The arguments after ``atol`` are those of :func:`gradient_report`. Float64
    enumeration reaches ~1e-15; the defaults leave room for an estimator computing in
    float32 (planted bugs are off by 1e-2 and more). A Monte Carlo evaluation (estimators that mix groups) also allows
    ``Z_CRIT = 5`` standard errors. On failure the ``AssertionError`` names the worst
    coordinates (parameter, exact value, estimate), the cosine and projection ratio, and
    HINTs (a (G-1)/G scaling, a sign flip, a zero gradient, an exact match with a known
    biased estimator such as GRPO's std normalisation or a length re-weighting).
    Returns the :class:`GradientReport`.
    """
    model = small_mdp() if mdp is None else mdp
    report = gradient_report(
        estimator,
        model,
        group_size=group_size,
        options=options,
        inputs=inputs,
        aggregation=aggregation,
        method=method,
        mc_samples=mc_samples,
        seed=seed,
        name=name,
    )
    allowed = _allowed(report.grad_J, report.stderr, rtol, atol)
    if bool(((report.mean - report.grad_J).abs() <= allowed).all()):
        return report
    hints = list(report.hints) + suspect_hints(model, report)
    raise AssertionError(
        _failure(
            "assert_unbiased failed",
            report,
            report.grad_J,
            "exact grad J",
            allowed,
            rtol,
            atol,
            hints,
        )
    )


def assert_biased(
    estimator: str | AdvantageEstimator,
    mdp: ExactModel | None = None,
    *,
    expected_scale: float | None = None,
    cosine: tuple[float, float] | None = None,
    projection: tuple[float, float] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    min_relative_bias: float = 1e-6,
    group_size: int = 1,
    options: Mapping[str, Any] | None = None,
    inputs: InputSpec | Mapping[str, Any] | None = None,
    aggregation: str = "seq-mean-token-sum",
    method: str = "auto",
    mc_samples: int = 20_000,
    seed: int = 0,
    name: str | None = None,
) -> GradientReport:
    """Assert a known bias, and that the estimator is biased at all.

    * ``expected_scale=s``: ``E g = s * grad J`` to ``atol + rtol * |s grad J|`` per
      coordinate (e.g. ``(G - 1) / G`` for GRPO without std).
    * ``cosine=(lo, hi)``: the cosine of ``E g`` and ``grad J`` lies in the band (e.g.
      ``(0.9, 0.999)`` for GRPO with std, biased in direction only).
    * ``projection=(lo, hi)``: the projection ratio lies in the band.
    * Always: ``|E g - grad J| / |grad J| > min_relative_bias`` (exact) or ``z_max > 5``
      (Monte Carlo): an estimator that turned unbiased fails too.

    Other arguments as :func:`gradient_report`. Returns the :class:`GradientReport`.
    """
    model = small_mdp() if mdp is None else mdp
    report = gradient_report(
        estimator,
        model,
        group_size=group_size,
        options=options,
        inputs=inputs,
        aggregation=aggregation,
        method=method,
        mc_samples=mc_samples,
        seed=seed,
        name=name,
    )
    if report.is_exact:
        unbiased = report.relative_error <= min_relative_bias
    else:
        unbiased = report.z_max is not None and report.z_max <= Z_CRIT
    if unbiased:
        raise AssertionError(
            f"assert_biased failed: {report.estimator} is unbiased on {report.mdp}: "
            f"|E g - grad J| / |grad J| = {fmt(report.relative_error)}"
            + (f", z_max {report.z_max:.2f}" if report.z_max is not None else "")
            + " (expected a bias). HINT: the bias was fixed? then use assert_unbiased"
        )
    problems = []
    if expected_scale is not None:
        target = expected_scale * report.grad_J
        allowed = _allowed(target, report.stderr, rtol, atol)
        if not bool(((report.mean - target).abs() <= allowed).all()):
            hints = shape_hints(
                report.cosine,
                report.projection,
                float(report.mean.norm()) / max(float(report.grad_J.norm()), 1e-300),
                report.group_size,
                model.tree.horizon,
                exact=report.is_exact,
            )
            raise AssertionError(
                _failure(
                    f"assert_biased(expected_scale={expected_scale:.6g}) failed",
                    report,
                    target,
                    f"{expected_scale:.6g} x grad J",
                    allowed,
                    rtol,
                    atol,
                    hints + suspect_hints(model, report),
                )
            )
    for label, band, value in (("cosine", cosine, report.cosine), ("projection ratio", projection, report.projection)):  # fmt: skip
        if band is not None and not band[0] <= value <= band[1]:
            problems.append(f"{label} {value:.6f} outside [{band[0]:g}, {band[1]:g}]")
    if problems:
        raise AssertionError(
            f"assert_biased failed: {report.estimator} (G={report.group_size}, "
            f"{report.aggregation}) on {report.mdp}: "
            + "; ".join(problems)
            + "\n"
            + report.summary()
        )
    return report
