"""Off-policy assertions (``behavior=``) and the clipped-surrogate check.

* :func:`offpolicy_report` / :func:`assert_unbiased_offpolicy` /
  :func:`assert_biased_offpolicy`: the exact mean of an estimator (advantage, policy loss,
  behavior correction, aggregation) when responses are drawn from a behavior policy
  ``behavior`` (another temperature, top-k / top-p, a stale policy, a table), against
  ``grad J(pi)``. Corrections and losses may be registry names or your own functions.
* :func:`assert_clipped_surrogate`: drives the ratios ``pi / pi_old`` far beyond the clip
  range, with advantages of both signs, and compares the per-token gradient of your loss
  with PPO's clipped surrogate ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``. A
  surrogate with ``min`` and ``max`` swapped, or one that never clips, or one that clips
  whatever the advantage's sign, is named in the HINT.

Theory: ``docs/theory.md#off-policy`` and ``docs/estimators.md``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from llm_mdp import estimators as est
from llm_mdp import estimators_offpolicy as offp
from llm_mdp.theory import ExactModel, InputSpec
from llm_mdp.theory.offpolicy import Behavior, OffPolicyModel, OffPolicySpec, make_behavior

from ._format import fmt, worst_coordinates
from ._registry import display_name, registered_advantage
from .gradients import GradientReport
from .mdps import small_mdp

__all__ = [
    "assert_biased_offpolicy",
    "assert_clipped_surrogate",
    "assert_unbiased_offpolicy",
    "offpolicy_report",
]

_COUNTER = itertools.count()
BehaviorArg = Behavior | Mapping[str, Any] | str


@contextlib.contextmanager
def _registered(table: dict[str, Any], kind: str, fn: str | Callable[..., Any]) -> Iterator[str]:
    if isinstance(fn, str):
        if fn not in table:
            raise ValueError(f"unknown {kind} {fn!r}; known: {', '.join(sorted(table))}")
        yield fn
        return
    key = f"llm_mdp.testing:{display_name(fn)}#{next(_COUNTER)}"
    table[key] = fn
    try:
        yield key
    finally:
        table.pop(key, None)


def _behavior(model: ExactModel, behavior: BehaviorArg) -> Behavior:
    """A :class:`Behavior`, the keyword arguments of ``make_behavior``, or ``"kind=value"``
    (``"temperature=0.7"``, ``"top_p=0.9"``, ``"top_k=2"``, ``"on-policy"``)."""
    if isinstance(behavior, Behavior):
        return behavior
    if isinstance(behavior, str):
        kind, _, value = behavior.partition("=")
        if not value:
            return make_behavior(model, kind)
        typed: Any = int(value) if kind == "top_k" else float(value)
        return make_behavior(model, kind, **{kind: typed})
    return make_behavior(model, **dict(behavior))


def offpolicy_report(
    estimator: str | Callable[..., Tensor] = "reinforce",
    mdp: ExactModel | None = None,
    *,
    behavior: BehaviorArg,
    correction: str | Callable[..., Tensor] = "none",
    cap: float = math.inf,
    cap_low: float | None = None,
    loss: str | Callable[..., Any] = "vanilla",
    loss_options: Mapping[str, Any] | None = None,
    old: str = "target",
    group_size: int = 1,
    options: Mapping[str, Any] | None = None,
    inputs: InputSpec | Mapping[str, Any] | None = None,
    aggregation: str = "seq-mean-token-sum",
    name: str | None = None,
) -> GradientReport:
    """Exact bias, cosine and variance of an estimator trained on responses from ``behavior``.

    Args:
        estimator: advantage estimator (name or ``fn(batch, **options) -> (B, R)``).
        behavior: see :func:`_behavior`.
        correction: behavior correction, a name or ``fn(logp, behavior_logp, mask, *, cap,
            cap_low) -> (B, R)`` weights multiplying the per-token loss.
        loss: policy loss, a name or ``fn(logp, old_logp, advantages, mask, **options)``
            returning a :class:`~llm_mdp.estimators.PolicyLossOutput`.
        old: ``"target"`` (the loss's ``old_logp`` is ``pi``'s) or ``"behavior"`` (``mu``'s).

    The other arguments are those of :func:`~llm_mdp.testing.gradient_report`.
    """
    model = small_mdp() if mdp is None else mdp
    beh = _behavior(model, behavior)
    om = OffPolicyModel(model, beh)
    label = name or display_name(estimator)
    inp = inputs if isinstance(inputs, InputSpec) else InputSpec(**dict(inputs or {}))
    with (
        registered_advantage(estimator) as adv_key,
        _registered(offp.BEHAVIOR_CORRECTIONS, "behavior correction", correction) as corr_key,
        _registered(est.POLICY_LOSSES, "policy loss", loss) as loss_key,
    ):
        spec = OffPolicySpec(
            advantage=adv_key,
            advantage_options=dict(options or {}),
            group_size=group_size,
            inputs=inp,
            loss=loss_key,
            loss_options=dict(loss_options or {}),
            correction=corr_key,
            cap=cap,
            cap_low=cap_low,
            old=old,
            aggregation=aggregation,
        )
        mom = om.moments(spec)
    cmp = om.compare(mom)
    hints = _offpolicy_hints(om, correction, cap, cmp.relative_error)
    return GradientReport.from_moments(
        model,
        mom,
        cmp,
        estimator=f"{label} under {beh.name}",
        group_size=group_size,
        aggregation=aggregation,
        hints=hints,
    )


def _offpolicy_hints(om: OffPolicyModel, correction: Any, cap: float, rel: float) -> list[str]:
    if rel <= 1e-9:
        return []
    hints = []
    if not om.covers:
        missing = float(om.model.prob[~om.support].sum())
        hints.append(
            f"off-policy: the behavior {om.behavior.name} never samples responses carrying "
            f"{missing:.4g} of pi's probability (top-k / top-p truncation): that part of "
            "grad J is irreducible, no importance weight restores it"
        )
    if correction == "none":
        hints.append(
            "off-policy: no correction; the sequence ratio pi(W) / mu(W) "
            "(behavior_correction='seq_tis', cap=inf) makes REINFORCE unbiased under mu"
        )
    elif correction in ("tis", "mis"):
        hints.append(
            "off-policy: token-level ratios re-weight each token's action only, not the "
            "prefix distribution nor the continuation behind RM(W): biased even untruncated; "
            "use the sequence ratio (seq_tis)"
        )
    elif correction in ("seq_tis", "seq_mis") and om.covers:
        rho = float(om.sequence_ratio().max())
        if cap < rho:
            hints.append(
                f"off-policy: the cap C={cap:g} cuts sequence ratios up to {rho:.4g}; the "
                f"truncation bias vanishes once C >= {rho:.4g}"
            )
    return hints


def _raise(title: str, report: GradientReport, target: Tensor, allowed: Tensor) -> None:
    n_bad, lines = worst_coordinates(
        report.mean, target, allowed, report.coordinate, target_label="exact grad J(pi)"
    )
    msg = [
        f"{title}: {report.estimator} (G={report.group_size}, {report.aggregation})",
        f"  on {report.mdp}",
        f"  E_mu[g] differs from grad J(pi) on {n_bad} of {len(target)} coordinates; worst:",
        *lines,
        f"  |E g - grad J| / |grad J| = {fmt(report.relative_error)}, cosine {report.cosine:.6f}",
        *[f"  HINT: {h}" for h in report.hints],
    ]
    raise AssertionError("\n".join(msg))


def assert_unbiased_offpolicy(
    estimator: str | Callable[..., Tensor] = "reinforce",
    mdp: ExactModel | None = None,
    *,
    behavior: BehaviorArg,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    **kwargs: Any,
) -> GradientReport:
    """Assert ``E_mu[g] = grad J(pi)`` per coordinate (``atol + rtol |grad J|``); keyword
    arguments as :func:`offpolicy_report`. The failure names the worst coordinates and
    HINTs (uncovered support, token-level ratios, a cap below the largest ratio)."""
    report = offpolicy_report(estimator, mdp, behavior=behavior, **kwargs)
    allowed = atol + rtol * report.grad_J.abs()
    if not bool(((report.mean - report.grad_J).abs() <= allowed).all()):
        _raise("assert_unbiased_offpolicy failed", report, report.grad_J, allowed)
    return report


def assert_biased_offpolicy(
    estimator: str | Callable[..., Tensor] = "reinforce",
    mdp: ExactModel | None = None,
    *,
    behavior: BehaviorArg,
    relative_bias: tuple[float, float] = (1e-6, math.inf),
    **kwargs: Any,
) -> GradientReport:
    """Assert ``|E_mu g - grad J| / |grad J|`` lies in ``relative_bias`` (biased at all by default)."""
    report = offpolicy_report(estimator, mdp, behavior=behavior, **kwargs)
    lo, hi = relative_bias
    if not lo <= report.relative_error <= hi:
        raise AssertionError(
            f"assert_biased_offpolicy failed: {report.estimator}: relative bias "
            f"{fmt(report.relative_error)} outside [{lo:g}, {hi:g}]\n{report.summary()}"
        )
    return report


# ----------------------------------------------------------------------- clipped surrogate


def _reference_grad(adv: Tensor, ratio: Tensor, low: float, high: float, swap: str) -> Tensor:
    """``d/d logp`` per token of the reference surrogate and of its classic bugs."""
    inside_hi, inside_lo = ratio <= 1.0 + high, ratio >= 1.0 - low
    live = {
        "reference": torch.where(adv >= 0, inside_hi, inside_lo),  # max(-A r, -A clip(r))
        "swapped": torch.where(adv >= 0, inside_lo, inside_hi),  # min(...)
        "unclipped": torch.ones_like(ratio, dtype=torch.bool),  # -A r
        "clamp-only": inside_hi & inside_lo,  # -A clip(r)
    }[swap]
    return torch.where(live, -adv * ratio, torch.zeros_like(ratio))


CLIP_HINTS = {
    "swapped": "clipping: the gradient is that of the clipped surrogate with min and max "
    "swapped (PPO takes max(-A r, -A clip(r)) of the *losses*, min of the objectives): "
    "tokens pushed past the clip range keep their gradient, those inside lose it",
    "unclipped": "clipping: the loss never clips: tokens whose ratio already left "
    "[1 - eps_low, 1 + eps_high] in the advantage's direction keep their gradient",
    "clamp-only": "clipping: the loss is -A clip(r) without the max with -A r: it also "
    "zeroes the gradient of tokens whose ratio moved against the advantage",
}


def assert_clipped_surrogate(
    loss_fn: str | Callable[..., Any],
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    options: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    length: int = 8,
    max_log_ratio: float = 1.0,
    seed: int = 0,
    rtol: float = 1e-6,
    atol: float = 1e-9,
) -> None:
    """Assert ``loss_fn`` has PPO's clipped-surrogate gradient where clipping matters.

    ``loss_fn(logp, old_logp, advantages, mask, **options)`` returns a per-token
    ``(B, R)`` loss or a :class:`~llm_mdp.estimators.PolicyLossOutput` (a name works too);
    ``options`` default to ``{"clip_low": clip_low, "clip_high": clip_high}``. Log-ratios
    are uniform in ``[-max_log_ratio, max_log_ratio]`` (ratios 0.37 .. 2.7 by default,
    far outside the clip range) and advantages of both signs; the per-token gradient of
    ``loss.sum()`` must be ``-A r`` where the reference surrogate is unclipped, 0 where it
    is clipped. On failure the HINT names the clipping bug it matches.
    """
    high = clip_low if clip_high is None else clip_high
    fn = est.get_policy_loss(loss_fn) if isinstance(loss_fn, str) else loss_fn
    opts = dict(options) if options is not None else {"clip_low": clip_low, "clip_high": clip_high}
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, length)
    lengths = torch.randint(1, length + 1, (batch_size,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    old = -1.0 + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    delta = (2 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1) * max_log_ratio
    logp = (old + delta).requires_grad_(True)
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    out = fn(logp, old, adv, mask, **opts)
    per_token = out.loss if isinstance(out, est.PolicyLossOutput) else out
    (grad,) = torch.autograd.grad(per_token.sum(), logp, allow_unused=True)
    grad = torch.zeros_like(logp) if grad is None else grad.detach()
    ratio = delta.exp()
    grads = {k: _reference_grad(adv, ratio, clip_low, high, k)[mask] for k in ("reference", "swapped", "unclipped", "clamp-only")}  # fmt: skip
    got = grad[mask]
    tol = atol + rtol * grads["reference"].abs()
    bad = (got - grads["reference"]).abs() > tol
    if not bool(bad.any()):
        return
    outside = ~((ratio[mask] >= 1 - clip_low) & (ratio[mask] <= 1 + high))
    match = [k for k in CLIP_HINTS if torch.allclose(got, grads[k], rtol=rtol, atol=atol)]
    hint = (
        CLIP_HINTS[match[0]]
        if match
        else "clipping: the loss gradient differs from the reference clipped surrogate "
        f"on {int((bad & outside).sum())} tokens outside the clip range and "
        f"{int((bad & ~outside).sum())} inside it"
    )
    idx = torch.nonzero(bad).squeeze(1)[:5].tolist()
    rows = [
        f"    token {i}: A={float(adv[mask][i]):+.4f}, ratio={float(ratio[mask][i]):.4f}: "
        f"d loss / d logp = {float(got[i]):+.6g}, clipped surrogate {float(grads['reference'][i]):+.6g}"
        for i in idx
    ]
    raise AssertionError(
        "\n".join(
            [
                f"assert_clipped_surrogate failed: {display_name(loss_fn)} (clip_low={clip_low:g}, "
                f"clip_high={high:g}): the gradient differs on {int(bad.sum())} of "
                f"{int(mask.sum())} tokens ({int(outside.sum())} have ratios outside the clip "
                "range); first ones:",
                *rows,
                f"  HINT: {hint}",
            ]
        )
    )
