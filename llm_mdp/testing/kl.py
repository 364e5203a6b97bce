"""KL estimators: exact expectation against the exact KL, and the gradient of a placement.

With ``x = log pi - log pi_ref`` on the sampled token, the sequence-level reverse KL is
``KL(pi || pi_ref) = E_W sum_t x_t``. k1 (``x``) and k3 (``exp(-x) - 1 + x``) have exactly
that expectation; k2 (``x^2 / 2``) only to second order in ``pi - pi_ref``. Placements
(``docs/theory.md#kl``): ``"reward"`` (the estimate, detached, in the token rewards with a
REINFORCE return: unbiased for k1) and ``"loss"`` (added to the loss and differentiated:
k3's gradient ``(1 - pi_ref / pi) grad log pi`` is not the reverse KL's).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llm_mdp.theory import ExactModel, KLModel
from llm_mdp.theory.specs import F64

from ._format import coordinate_namer, describe_mdp, fmt, worst_coordinates
from ._registry import display_name, registered_kl
from .mdps import reference_policy, small_mdp

__all__ = ["KLEstimator", "KLReport", "assert_kl_estimator", "kl_report"]

KLEstimator = Callable[..., Tensor]
"""``fn(logp, ref_logp, mask=None) -> Tensor (B, R)`` (see :mod:`llm_mdp.testing`)."""

KNOWN_FORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "k1 = x": lambda x: x,
    "k2 = x^2 / 2": lambda x: x.pow(2) / 2,
    "k3 = exp(-x) - 1 + x": lambda x: torch.exp(-x) - 1 + x,
    "k3 with the ratio inverted, exp(x) - 1 - x": lambda x: torch.exp(x) - 1 - x,
    "-x (log pi_ref - log pi: the sign flipped, or logp and ref_logp swapped)": lambda x: -x,
    "x^2 (k2 without the 1/2)": lambda x: x.pow(2),
}
"""Per-token forms a KL estimator is compared with (``x = log pi - log pi_ref``)."""

FORM_HINTS = {
    "k3 with the ratio inverted, exp(x) - 1 - x": (
        "k3 with the ratio inverted: exp(logp - ref_logp) - 1 - (logp - ref_logp) (or logp and "
        "ref_logp swapped); k3 for KL(pi || pi_ref) under samples of pi uses rho = pi_ref / pi: "
        "exp(ref_logp - logp) - 1 - (ref_logp - logp)"
    ),
    "-x (log pi_ref - log pi: the sign flipped, or logp and ref_logp swapped)": (
        "sign flip: the estimate is log pi_ref - log pi; k1 is logp - ref_logp"
    ),
    "x^2 (k2 without the 1/2)": "k2 without the 1/2: twice the KL to second order",
    "k2 = x^2 / 2": (
        "this is k2 = x^2 / 2, right only to second order: use value='second-order' for it"
    ),
}


@dataclass(frozen=True, eq=False)
class KLReport:
    """A KL estimator's exact expectation and, per placement, its expected gradient.

    Attributes:
        estimator: display name. ``mdp``: the MDP's description.
        exact_kl: ``KL(pi || pi_ref)`` of whole responses (the target).
        reverse_kl: ``KL(pi_ref || pi)`` (the other direction).
        expected_value: ``E_W sum_t k_t``; ``value_error = expected_value - exact_kl``.
        forms: the known per-token forms (:data:`KNOWN_FORMS`) the estimator equals on
            every token of every response.
        grad_kl: ``(P,)`` exact ``grad KL(pi || pi_ref)``.
        gradients: ``placement -> (P,)`` expected gradient of that placement.
        trace_cov: ``placement -> `` variance (trace of the covariance) per response.
    """

    estimator: str
    mdp: str
    exact_kl: float
    reverse_kl: float
    expected_value: float
    forms: tuple[str, ...]
    grad_kl: Tensor
    gradients: dict[str, Tensor]
    trace_cov: dict[str, float]
    _namer: Callable[[int], str] = field(repr=False)

    @property
    def value_error(self) -> float:
        return self.expected_value - self.exact_kl

    def cosine(self, placement: str) -> float:
        g = self.gradients[placement]
        gn, tn = float(g.norm()), float(self.grad_kl.norm())
        # a zero expectation (k1 in the loss) has no direction: cosine 0
        return float(g @ self.grad_kl) / (gn * tn) if gn > 1e-12 * tn and tn > 0 else 0.0

    def projection(self, placement: str) -> float:
        return float(self.gradients[placement] @ self.grad_kl) / float(self.grad_kl @ self.grad_kl)

    def summary(self) -> str:
        lines = [
            f"{self.estimator} on {self.mdp}:",
            f"  E sum_t k = {fmt(self.expected_value)}, KL(pi || pi_ref) = {fmt(self.exact_kl)} "
            f"(error {self.value_error:+.3e}), KL(pi_ref || pi) = {fmt(self.reverse_kl)}",
        ]
        if self.forms:
            lines.append(f"  equals {', '.join(self.forms)} on every token")
        for p in self.gradients:
            err = float((self.gradients[p] - self.grad_kl).abs().max())
            lines.append(
                f"  placement {p!r}: max |E g - grad KL| {err:.3e}, cosine {self.cosine(p):.6f}, "
                f"projection ratio {self.projection(p):.6f}, variance {fmt(self.trace_cov[p])}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _reverse_kl(klm: KLModel) -> float:
    """``KL(pi_ref || pi)`` over whole responses (responses of the tree, ref probabilities)."""
    ref_seq = klm.ref_logp.sum(1)
    p_ref = ref_seq.exp() / len(klm.model.tree.prompts)
    return float(p_ref @ (ref_seq - klm.logp.sum(1)))


def _interpolated(model: ExactModel, ref: Any, t: float) -> Any:
    """A policy with parameters ``theta + t (theta_ref - theta)``."""
    out = copy.deepcopy(model.policy)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name not in ref_params or ref_params[name].shape != p.shape:
                raise ValueError(
                    f"value='second-order' interpolates between the policy and ref_policy, "
                    f"which need the same parameters; {name!r} differs"
                )
            p.add_(t * (ref_params[name].to(p.dtype) - p))
    return out


def kl_report(
    kl_fn: str | KLEstimator,
    mdp: ExactModel | None = None,
    *,
    ref_policy: Any = None,
    placements: tuple[str, ...] = ("reward", "loss"),
    name: str | None = None,
) -> KLReport:
    """Exact expectation and expected placement gradients of a KL estimator.

    ``kl_fn(logp, ref_logp, mask=None) -> (B, R)`` (or a registry name), differentiable
    in ``logp``. ``ref_policy`` defaults to :func:`reference_policy` of the MDP's policy.
    """
    model = small_mdp() if mdp is None else mdp
    ref = reference_policy(model) if ref_policy is None else ref_policy
    label = name or display_name(kl_fn)
    klm = KLModel(model, ref)
    with registered_kl(kl_fn) as key:
        k, _ = klm.estimates(key)
        value = klm.expected_value(key)
        gradients, covs = {}, {}
        for placement in placements:
            mom = klm.moments(key, placement)
            gradients[placement] = mom.mean
            covs[placement] = mom.trace_cov
    mask = model.tree.mask
    forms = []
    for form, f in KNOWN_FORMS.items():
        ref_k = f(klm.x).masked_fill(~mask, 0.0)
        if torch.allclose(k.to(F64), ref_k, rtol=1e-6, atol=1e-9):
            forms.append(form)
    return KLReport(
        estimator=label,
        mdp=describe_mdp(model),
        exact_kl=klm.kl,
        reverse_kl=_reverse_kl(klm),
        expected_value=value,
        forms=tuple(forms),
        grad_kl=klm.grad_kl,
        gradients=gradients,
        trace_cov=covs,
        _namer=coordinate_namer(model),
    )


def _value_hints(report: KLReport, rtol: float) -> list[str]:
    hints = [FORM_HINTS[f] for f in report.forms if f in FORM_HINTS]
    kl, rev, val = report.exact_kl, report.reverse_kl, report.expected_value
    if abs(val - rev) <= rtol * abs(rev) + 1e-12 and abs(kl - rev) > 1e-9:
        hints.append(
            "the expectation equals KL(pi_ref || pi) instead of KL(pi || pi_ref): the "
            "directions are swapped"
        )
    if abs(val + kl) <= rtol * kl + 1e-12:
        hints.append("the expectation is -KL: a sign flip")
    if not hints and kl > 0:
        hints.append(
            f"E k / KL = {val / kl:.6g}; an estimator of KL(pi || pi_ref) under samples of pi "
            "must have mean x = log pi - log pi_ref per state (k1, k3)"
        )
    return hints


def _grad_hints(report: KLReport, placement: str, unbiased_expected: bool) -> list[str]:
    hints = []
    cos, proj = report.cosine(placement), report.projection(placement)
    g = report.gradients[placement]
    if float(g.norm()) <= 1e-9 * float(report.grad_kl.norm()):
        if placement == "loss":
            hints.append(
                "the expected gradient is 0: k1 in the loss gives sum_t grad log pi, zero in "
                "expectation; put k1 in the reward (unbiased) instead"
            )
        else:
            hints.append("the expected gradient is 0: is the estimate detached or constant?")
    elif abs(cos + 1) <= 1e-6:
        hints.append(
            f"sign flip: E g = {proj:.6g} x grad KL; the KL penalty must be subtracted from "
            "the reward (kl_in_reward) or added to the loss"
        )
    elif unbiased_expected and placement == "loss":
        hints.append(
            "a KL estimate in the loss is differentiated per token only: k3 gives "
            "(1 - pi_ref / pi) grad log pi and k2 x grad log pi, which miss the later tokens' "
            "log-ratios; k1 in the reward is the unbiased reverse-KL gradient"
        )
    elif unbiased_expected:
        hints.append(
            f"cosine {cos:.6f}, projection ratio {proj:.6f}: in the reward, E[return of k] "
            "must equal the KL of the rest of the response; only k1 (x) does that exactly"
        )
    return hints


def assert_kl_estimator(
    kl_fn: str | KLEstimator,
    mdp: ExactModel | None = None,
    *,
    ref_policy: Any = None,
    value: str | None = "exact",
    placement: str | None = None,
    gradient: str | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    name: str | None = None,
) -> KLReport:
    """Assert what a KL estimator ``kl_fn(logp, ref_logp, mask=None) -> (B, R)`` estimates.

    Args:
        value: ``"exact"``: ``E_W sum_t k_t = KL(pi || pi_ref)`` to ``atol + rtol * KL``
            (k1, k3); ``"second-order"``: the relative error shrinks at least linearly as
            ``pi_ref`` moves towards ``pi`` (k2; the parameters are interpolated to 1/10
            and 1/100 of the way, and the error must shrink 4x or more); ``None``: not
            checked.
        placement: ``"reward"`` or ``"loss"`` (see the module docstring) for ``gradient``.
        gradient: ``"unbiased"``: the placement's expected gradient is ``grad KL(pi ||
            pi_ref)`` per coordinate (k1 in the reward); ``"biased"``: it is not (k3 in the
            loss); ``None``: not checked.
        ref_policy: the reference (default :func:`reference_policy` of the MDP's policy).

    On failure the message gives the numbers and HINTs: a k3 with the ratio inverted
    (``exp(x) - 1 - x``), a sign flip, the directions swapped (the expectation is
    ``KL(pi_ref || pi)``), k2 tested as exact, k1 in the loss (zero gradient). Returns the
    :class:`KLReport`.
    """
    if value not in (None, "exact", "second-order"):
        raise ValueError(f"value must be 'exact', 'second-order' or None, got {value!r}")
    if gradient not in (None, "unbiased", "biased"):
        raise ValueError(f"gradient must be 'unbiased', 'biased' or None, got {gradient!r}")
    if gradient is not None and placement not in ("reward", "loss"):
        raise ValueError(f"gradient={gradient!r} needs placement='reward' or 'loss'")
    model = small_mdp() if mdp is None else mdp
    ref = reference_policy(model) if ref_policy is None else ref_policy
    placements = (placement,) if placement is not None else ()
    report = kl_report(kl_fn, model, ref_policy=ref, placements=placements, name=name)
    head = f"assert_kl_estimator failed: {report.estimator} on {report.mdp}"
    if value == "exact" and abs(report.value_error) > atol + rtol * abs(report.exact_kl):
        hints = _value_hints(report, 1e-6)
        raise AssertionError(
            "\n".join(
                [
                    head,
                    f"  E_W sum_t k_t = {fmt(report.expected_value)}, exact KL(pi || pi_ref) = "
                    f"{fmt(report.exact_kl)} (diff {report.value_error:+.3e}; rtol={rtol:g}, "
                    f"atol={atol:g}); KL(pi_ref || pi) = {fmt(report.reverse_kl)}",
                    *[f"  HINT: {h}" for h in hints],
                ]
            )
        )
    if value == "second-order":
        rel = []
        for t in (0.1, 0.01):
            near = kl_report(
                kl_fn, model, ref_policy=_interpolated(model, ref, t), placements=(), name=name
            )
            rel.append((abs(near.value_error) / near.exact_kl, near.expected_value / near.exact_kl))
        (rel_far, ratio_far), (rel_near, ratio_near) = rel
        if rel_near > 1e-9 and (rel_near > rel_far / 4 or rel_near > 0.05):
            hints = _value_hints(report, 1e-6)
            raise AssertionError(
                "\n".join(
                    [
                        head + " (value='second-order')",
                        f"  relative error of E sum_t k against KL(pi || pi_ref): {rel_far:.4g} "
                        f"with the reference moved to 1/10 of its distance, {rel_near:.4g} at "
                        "1/100 (a second-order estimator's shrinks about 10x)",
                        f"  E k / KL: {ratio_far:.6g} -> {ratio_near:.6g}",
                        *[f"  HINT: {h}" for h in hints],
                    ]
                )
            )
    if gradient is not None and placement is not None:
        g = report.gradients[placement]
        allowed = atol + rtol * report.grad_kl.abs()
        ok = bool(((g - report.grad_kl).abs() <= allowed).all())
        if ok != (gradient == "unbiased"):
            if gradient == "unbiased":
                n_bad, lines = worst_coordinates(
                    g, report.grad_kl, allowed, report._namer, target_label="exact grad KL"
                )
                detail = [
                    f"  placement {placement!r}: E g differs from the exact grad KL(pi || pi_ref) on "
                    f"{n_bad} of {len(g)} coordinates (rtol={rtol:g}, atol={atol:g}); worst:",
                    *lines,
                ]
            else:
                detail = [
                    f"  placement {placement!r}: E g equals grad KL(pi || pi_ref) (expected a "
                    "biased gradient). HINT: the bias was fixed? then use gradient='unbiased'"
                ]
            detail.append(
                f"  cosine {report.cosine(placement):.6f}, projection ratio "
                f"{report.projection(placement):.6f}"
            )
            if gradient == "unbiased":
                detail += [
                    f"  HINT: {h}"
                    for h in _grad_hints(report, placement, True) + _value_hints_if(report)
                ]
            raise AssertionError("\n".join([head, *detail]))
    return report


def _value_hints_if(report: KLReport) -> list[str]:
    """Form hints worth adding to a gradient failure (a wrong estimator, not a placement)."""
    return [FORM_HINTS[f] for f in report.forms if f in FORM_HINTS and not f.startswith("k2")]
