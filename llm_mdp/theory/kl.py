"""Exact KL to a reference policy and the bias of each KL estimator and placement.

Per token, ``x = log pi(w_t | s_t) - log pi_ref(w_t | s_t)`` on the sampled token; the
sequence KL is ``KL(pi || pi_ref) = E_W sum_t x_t`` (chain rule over the tree). For every
registered KL estimator ``k`` (:data:`llm_mdp.estimators.KL_ESTIMATORS`) this computes
exactly:

* ``E_W sum_t k_t`` against the exact KL (k1 and k3 are unbiased, k2 is right to second
  order in ``pi - pi_ref``; an estimator with a sign or ratio error shows up here);
* the expected gradient of each placement against the exact ``grad KL``:

  - ``"reward"``: ``k`` (detached) in the token rewards with a REINFORCE return-to-go
    (:func:`~llm_mdp.estimators.kl_in_reward`, then
    :func:`~llm_mdp.estimators.discounted_returns`); the per-sample gradient of the KL
    is ``sum_t (sum_{u >= t} k_u) grad log pi(w_t | s_t)``. Unbiased for k1.
  - ``"loss"``: ``k`` added to the loss and differentiated through ``log pi``
    (``aggregate(k, mask, "seq-mean-token-sum")``): ``sum_t k'(x_t) grad log pi``. For
    k1 that is 0 in expectation, for k3 it is ``(1 - pi_ref / pi) grad log pi``: the
    gradient of a different divergence, biased for the reverse KL. k2 gives
    ``sum_t x_t grad log pi``, which misses the log-ratios of later tokens (exact only
    for one-token responses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llm_mdp import estimators as est

from .moments import ExactModel
from .specs import F64, GradientMoments
from .specs import compare as compare_gradients
from .tables import as_f64_policy, flat_grad, node_log_probs

__all__ = ["KL_PLACEMENTS", "KLModel", "KLRow", "kl_rows"]

KL_PLACEMENTS = ("reward", "loss")


@dataclass(frozen=True)
class KLRow:
    """One KL estimator in one placement, exactly.

    Attributes:
        estimator: registry name (``k1``, ``k2``, ``k3``, ...).
        placement: ``"reward"`` or ``"loss"``.
        exact_kl: ``KL(pi || pi_ref)`` of whole responses.
        expected_value: ``E_W sum_t k_t``.
        value_error: ``expected_value - exact_kl``.
        grad_max_abs_error, grad_cosine, grad_projection: expected per-sample gradient
            against ``grad KL`` (:class:`~llm_mdp.theory.exact.Comparison`).
        trace_cov: trace of the covariance of the per-sample gradient.
        expected: what theory says of the gradient: ``"unbiased"`` or ``"biased"``
            (``"?"`` for estimators it does not know).
        passed: the gradient matched the expectation (``None`` when ``"?"``).
    """

    estimator: str
    placement: str
    exact_kl: float
    expected_value: float
    value_error: float
    grad_max_abs_error: float
    grad_cosine: float
    grad_projection: float
    trace_cov: float
    expected: str
    passed: bool | None


class KLModel:
    """Exact KL quantities of ``model``'s policy against ``ref_policy`` on the same tree.

    Attributes:
        x: ``(N, H)`` log-ratio on each position (0 on padding).
        kl: exact ``KL(pi || pi_ref)``; ``kl_by_nodes`` the same by the chain rule.
        grad_kl: ``(P,)`` exact gradient w.r.t. the policy parameters.
    """

    def __init__(self, model: ExactModel, ref_policy: Any) -> None:
        self.model = model
        tr = model.tree
        ref = as_f64_policy(ref_policy, F64)
        with torch.no_grad():
            ref_table = node_log_probs(ref, tr, next(ref.parameters()).device).cpu()
        self.ref_log_pi = ref_table
        flat_ref = ref_table.reshape(-1)
        self.ref_logp = flat_ref[tr.pair].masked_fill(~tr.mask, 0.0)
        self.logp = model.log_pi.reshape(-1)[tr.pair].masked_fill(~tr.mask, 0.0)
        self.x = self.logp - self.ref_logp
        self.kl = float(model.prob @ self.x.sum(1))
        # chain rule: sum over nodes of P(node) KL(pi(.|s) || pi_ref(.|s))
        pi = model.pi
        terms = torch.where(pi > 0, pi * (model.log_pi - ref_table), torch.zeros((), dtype=F64))
        self.kl_by_nodes = float(model.node_prob @ terms.sum(1))
        graph = model._log_pi_graph.reshape(-1)
        logp_graph = graph[tr.pair].masked_fill(~tr.mask, 0.0).sum(1)
        kl_graph = (model._prob_graph * (logp_graph - self.ref_logp.sum(1))).sum()
        self.grad_kl = flat_grad(kl_graph, model.params)

    def estimates(self, name: str) -> tuple[Tensor, Tensor]:
        """``(k, dk/dlogp)``, both ``(N, H)``, of a registered KL estimator."""
        mask = self.model.tree.mask
        logp = self.logp.clone().requires_grad_(True)
        k = est.compute_kl(name, logp, self.ref_logp, mask)
        (dk,) = torch.autograd.grad(k.sum(), logp, allow_unused=True)
        dk = torch.zeros_like(logp) if dk is None else dk
        return k.detach().masked_fill(~mask, 0.0), dk.masked_fill(~mask, 0.0)

    def placement_weights(self, name: str, placement: str) -> Tensor:
        """``(N, H)`` per-token weights of ``grad log pi`` estimating ``grad KL``."""
        mask = self.model.tree.mask
        k, dk = self.estimates(name)
        if placement == "loss":  # per sequence the loss is sum_t k_t: gradient sum_t k'_t psi_t
            return dk
        if placement == "reward":
            rewards = est.kl_in_reward(torch.zeros_like(k), k, 1.0, mask)  # -k per token
            return -est.discounted_returns(rewards, mask, 1.0)
        raise ValueError(f"placement must be one of {KL_PLACEMENTS}, got {placement!r}")

    def moments(self, name: str, placement: str) -> GradientMoments:
        return self.model.moments_of_weights(self.placement_weights(name, placement))

    def expected_value(self, name: str) -> float:
        k, _ = self.estimates(name)
        return float(self.model.prob @ k.sum(1))


def _theory(name: str, placement: str, single_step: bool) -> str:
    if name == "k1" and placement == "reward":
        return "unbiased"
    if name == "k2" and placement == "loss" and single_step:
        # E[x grad log pi] misses only the future log-ratios, absent with one token
        return "unbiased"
    if name in ("k1", "k2", "k3"):
        return "biased"
    return "?"


def kl_rows(
    model: ExactModel,
    ref_policy: Any,
    estimators: Sequence[str] | None = None,
    placements: Sequence[str] = KL_PLACEMENTS,
    tol: float = 1e-8,
) -> list[KLRow]:
    """One :class:`KLRow` per registered KL estimator and placement."""
    klm = KLModel(model, ref_policy)
    names = list(estimators) if estimators is not None else list(est.KL_ESTIMATORS)
    rows = []
    scale = max(1.0, float(klm.grad_kl.abs().max()))
    for name in names:
        value = klm.expected_value(name)
        for placement in placements:
            mom = klm.moments(name, placement)
            cmp = compare_gradients(mom.mean, klm.grad_kl)
            expected = _theory(name, placement, int(model.tree.lengths.max()) == 1)
            unbiased = cmp.max_abs_error <= tol * scale
            passed = None if expected == "?" else unbiased == (expected == "unbiased")
            rows.append(
                KLRow(
                    estimator=name,
                    placement=placement,
                    exact_kl=klm.kl,
                    expected_value=value,
                    value_error=value - klm.kl,
                    grad_max_abs_error=cmp.max_abs_error,
                    grad_cosine=cmp.cosine,
                    grad_projection=cmp.projection,
                    trace_cov=mom.trace_cov,
                    expected=expected,
                    passed=passed,
                )
            )
    return rows
