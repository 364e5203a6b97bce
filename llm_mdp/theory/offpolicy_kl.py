"""The gradient each KL estimator follows in each placement, as an exact closed form.

``docs/theory.md#kl`` and Tang & Munos (arXiv 2506.09477): a KL *estimator* ``k(x_t)``
(``x_t = log pi - log pi_ref`` of the sampled token) is unbiased for the KL's *value*,
but what an agent differentiates is something else. With ``P(s)`` the probability of
reaching state ``s`` under ``pi`` and ``sg`` a stop-gradient:

=========  ============  =============================================================
estimator  placement     expected per-response gradient
=========  ============  =============================================================
any k      ``"reward"``  ``grad_theta E_{W ~ pi_theta} [sum_t sg(k_t)]``: the score-function
                         gradient of the estimate held fixed; for k1 exactly
                         ``grad KL(pi || pi_ref)``
k1         ``"loss"``    ``0`` (``E[grad log pi] = 0``)
k2         ``"loss"``    ``sum_s sg(P(s)) grad KL(pi(.|s) || pi_ref(.|s))``: the reverse KL
                         per state, visitation frozen (misses the future log-ratios)
k3         ``"loss"``    ``sum_s sg(P(s)) grad KL(pi_ref(.|s) || pi(.|s))``: the *forward* KL
                         per state, visitation frozen
=========  ============  =============================================================

:func:`documented_kl_gradient` computes the right column by autograd over the policy's
own node log-probabilities, independently of the estimator code, so that
``KLModel(model, ref).moments(name, placement).mean`` can be checked against it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .kl import KLModel
from .moments import ExactModel
from .specs import F64
from .tables import as_f64_policy, flat_grad, node_log_probs

__all__ = ["KL_GRADIENTS", "documented_kl_gradient"]

KL_GRADIENTS: dict[tuple[str, str], str] = {
    ("k1", "reward"): "grad KL(pi || pi_ref)",
    ("k2", "reward"): "grad E_pi[sum_t sg(k2_t)] (score function of the fixed estimate)",
    ("k3", "reward"): "grad E_pi[sum_t sg(k3_t)] (score function of the fixed estimate)",
    ("k1", "loss"): "0",
    ("k2", "loss"): "sum_s sg(P(s)) grad KL(pi(.|s) || pi_ref(.|s))",
    ("k3", "loss"): "sum_s sg(P(s)) grad KL(pi_ref(.|s) || pi(.|s))",
}
"""The gradient each (estimator, placement) follows in expectation, in words."""


def documented_kl_gradient(model: ExactModel, ref_policy: Any, name: str, placement: str) -> Tensor:
    """``(P,)`` the exact gradient :data:`KL_GRADIENTS` says ``(name, placement)`` follows."""
    if (name, placement) not in KL_GRADIENTS:
        raise ValueError(f"no documented gradient for {(name, placement)}; known: {KL_GRADIENTS}")
    tr = model.tree
    graph = node_log_probs(model.policy, tr, model.device).cpu()  # (n_nodes, A), differentiable
    ref = as_f64_policy(ref_policy, F64)
    with torch.no_grad():
        ref_table = node_log_probs(ref, tr, next(ref.parameters()).device).cpu()
    live = torch.isfinite(graph.detach()) & torch.isfinite(ref_table)
    zero = torch.zeros((), dtype=F64)
    if placement == "reward":
        k, _ = KLModel(model, ref_policy).estimates(name)
        logp_w = graph.reshape(-1)[tr.pair].masked_fill(~tr.mask, 0.0).sum(1)
        prob = logp_w.exp() / len(tr.prompts)
        return flat_grad((prob * k.sum(1)).sum(), model.params, retain=False)
    if name == "k1":
        return torch.zeros(model.num_params, dtype=F64)
    pi = graph.exp()
    if name == "k2":
        per_state = torch.where(live, pi * (graph - ref_table), zero).sum(1)
    else:  # k3: forward KL(pi_ref || pi) = sum_w ref (log ref - log pi)
        per_state = torch.where(live, ref_table.exp() * (ref_table - graph), zero).sum(1)
    return flat_grad((model.node_prob * per_state).sum(), model.params, retain=False)
