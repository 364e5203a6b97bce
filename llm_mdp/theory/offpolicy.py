"""Exact moments of estimators when responses come from a behavior policy ``mu``, not ``pi``.

Theory: ``docs/theory.md#off-policy``. A :class:`Behavior` is a ``(n_nodes, A)`` table of
``log mu(w | s)`` on the tree of an :class:`~llm_mdp.theory.exact.ExactModel` (whose policy
is the trained ``pi``): ``pi`` at another temperature, ``pi`` truncated by top-k or top-p,
a stale or perturbed copy of ``pi``, or any user table. :class:`OffPolicyModel` computes,
exactly, the mean and covariance of one draw's gradient

    ``g = -grad_theta aggregate(correction * loss(logp, old_logp, A, mask))``

when the ``G`` responses of a draw are sampled from ``mu``: every ordered group of
responses in ``mu``'s support is enumerated with probability ``prod_i mu(W_i)``, the
registered advantage estimator, policy loss (:data:`llm_mdp.estimators.POLICY_LOSSES`),
behavior correction (:data:`llm_mdp.estimators_offpolicy.BEHAVIOR_CORRECTIONS`) and
aggregation mode are run on it, and ``d loss / d logp`` (autograd) gives the per-token
coefficients of ``grad log pi``. The result is compared with ``grad J(pi)``.

Closed forms checked against the enumeration (``tests/test_offpolicy.py``):

* :meth:`OffPolicyModel.sequence_is_target`: ``E_mu[rho(W) f(W)] = sum_{W : mu(W) > 0}
  pi(W) f(W)``: with ``rho = pi(W) / mu(W)`` REINFORCE is unbiased iff ``mu`` covers ``pi``.
* :meth:`OffPolicyModel.truncation_bias` (top-k / top-p): ``mu(W) = pi(W) / prod_t Z(s_t)``
  on responses whose every token is kept (``Z(s)`` the kept mass at ``s``), 0 elsewhere;
  so uncorrected REINFORCE has mean ``sum_{W kept} pi(W) RM(W) psi(W) / prod_t Z(s_t)``
  and its bias splits into a re-weighting part (removed by the sequence ratio) and the
  *irreducible* part ``-sum_{W not kept} pi(W) RM(W) psi(W)``, which no weight of the
  sampled responses can restore.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llm_mdp import estimators as est
from llm_mdp import estimators_offpolicy as offp

from .moments import ExactModel
from .specs import F64, Comparison, EstimatorSpec, GradientMoments, InputSpec
from .tables import as_f64_policy, node_log_probs
from .tree import ResponseTree

__all__ = [
    "BEHAVIOR_KINDS",
    "Behavior",
    "OffPolicyModel",
    "OffPolicySpec",
    "TruncationBias",
    "make_behavior",
]

BEHAVIOR_KINDS = ("on-policy", "temperature", "top_k", "top_p", "stale", "perturbed", "table")
MAX_GROUPS = 400_000


# ----------------------------------------------------------------------------- behaviors


@dataclass(frozen=True, eq=False)
class Behavior:
    """A sampling policy ``mu`` on an exact model's tree.

    Attributes:
        name: display name (``"top_p=0.9"``).
        log_mu: ``(n_nodes, A)`` ``log mu(w | s)`` (``-inf`` where ``mu`` never samples ``w``).
        kept: ``(n_nodes, A)`` bool, ``mu > 0``.
        truncation: for top-k / top-p: ``mu = pi / Z`` on ``kept``; else ``False``.
    """

    name: str
    log_mu: Tensor = field(repr=False)
    kept: Tensor = field(repr=False)
    truncation: bool = False


def _normalize(log_table: Tensor, tree: ResponseTree) -> Tensor:
    """Rows renormalised; forced and chance nodes keep their fixed law ``tree.env_prob``
    (the behavior policy samples the policy's tokens, never the environment's)."""
    out = log_table - torch.logsumexp(log_table, dim=1, keepdim=True)
    out[tree.fixed] = tree.env_prob[tree.fixed].log()
    return out


def _keep_top(pi: Tensor, k: int | None, p: float | None) -> Tensor:
    """``(n_nodes, A)`` bool: the tokens top-k (``k``) or top-p (``p``) sampling keeps.

    Top-p keeps the smallest prefix of the tokens sorted by probability (ties by index)
    whose mass reaches ``p`` (the token that crosses ``p`` is kept), as Hugging Face and
    vLLM do.
    """
    order = torch.sort(pi, dim=1, descending=True, stable=True)
    if k is not None:
        rank_kept = torch.arange(pi.shape[1])[None, :] < k
    else:
        before = order.values.cumsum(1) - order.values  # mass strictly before each token
        rank_kept = before < (1.0 if p is None else p)
    kept = torch.zeros_like(pi, dtype=torch.bool)
    return kept.scatter(1, order.indices, rank_kept.expand_as(pi)) & (pi > 0)


def make_behavior(
    model: ExactModel,
    kind: str,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    policy: Any = None,
    scale: float = 0.5,
    seed: int = 0,
    table: Tensor | None = None,
) -> Behavior:
    """A behavior policy on ``model``'s tree (``kind`` in :data:`BEHAVIOR_KINDS`).

    * ``"on-policy"``: ``mu = pi``.
    * ``"temperature"``: ``mu ∝ pi^(1 / temperature)`` (``softmax(logits / T)``).
    * ``"top_k"`` / ``"top_p"``: ``pi`` truncated to its ``top_k`` most likely tokens, or to
      the nucleus of mass ``top_p``, renormalised.
    * ``"stale"``: another policy object over the same vocabulary (e.g. ``pi`` before an
      update, a copy run by another inference kernel).
    * ``"perturbed"``: ``mu ∝ pi exp(scale * eps)``, ``eps ~ N(0, 1)`` per (state, token), seeded.
    * ``"table"``: ``table`` is a user ``(n_nodes, A)`` table of probabilities (rows
      renormalised; zeros allowed).
    """
    tr, pi, log_pi = model.tree, model.pi, model.log_pi
    trunc = False
    if kind == "on-policy":
        log_mu, name = log_pi.clone(), "on-policy"
    elif kind == "temperature":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        log_mu, name = _normalize(log_pi / temperature, tr), f"T={temperature:g}"
    elif kind in ("top_k", "top_p"):
        if kind == "top_k" and (top_k is None or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1, got {top_k}")
        if kind == "top_p" and (top_p is None or not 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        keep = _keep_top(pi, top_k, top_p if kind == "top_p" else None)
        log_mu = _normalize(log_pi.masked_fill(~keep, -math.inf), tr)
        name = f"top_k={top_k}" if kind == "top_k" else f"top_p={top_p:g}"
        trunc = True
    elif kind == "stale":
        if policy is None:
            raise ValueError("kind='stale' needs policy= (the behavior policy object)")
        pol = as_f64_policy(policy, F64)
        with torch.no_grad():
            log_mu = node_log_probs(pol, tr, next(pol.parameters()).device).cpu()
        name = "stale"
    elif kind == "perturbed":
        gen = torch.Generator().manual_seed(seed)
        eps = torch.randn(log_pi.shape, generator=gen, dtype=F64)
        log_mu, name = _normalize(log_pi + scale * eps, tr), f"perturbed({scale:g})"
    elif kind == "table":
        if table is None:
            raise ValueError("kind='table' needs table= ((n_nodes, A) probabilities)")
        t = torch.as_tensor(table, dtype=F64)
        if t.shape != log_pi.shape or bool((t < 0).any()):
            raise ValueError(
                f"table must be non-negative with shape {tuple(log_pi.shape)}, got {tuple(t.shape)}"
            )
        log_mu, name = _normalize(t.log(), tr), "table"
    else:
        raise ValueError(f"kind must be one of {BEHAVIOR_KINDS}, got {kind!r}")
    return Behavior(name, log_mu, log_mu > -math.inf, trunc)


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class OffPolicySpec:
    """An estimator as an agent runs it: advantage, policy loss, correction, aggregation.

    Attributes:
        advantage: registered advantage estimator (:data:`~llm_mdp.estimators.ADVANTAGE_ESTIMATORS`).
        advantage_options: its keyword options.
        group_size: ``G`` responses per draw (one prompt).
        inputs: optional exact inputs of the advantage (baseline ...), as in
            :class:`~llm_mdp.theory.exact.InputSpec`.
        loss: registered policy loss (``vanilla``, ``ppo_clip``, ``gspo``, ``cispo`` ...).
        loss_options: its keyword options.
        correction: registered behavior correction (``none``, ``tis``, ``mis``, ``seq_tis``,
            ``seq_mis``); weights from the trainer's ``log pi`` against ``log mu``.
        cap, cap_low: the correction's truncation / mask bounds ``C`` (``inf``: none).
        old: the ``old_logp`` of the loss's ratio: ``"target"`` (``pi``, recomputed by the
            trainer; the ratio is 1 at the first step) or ``"behavior"`` (``mu``'s
            log-probs, as when the sampler's log-probs are used as ``pi_old``).
        aggregation: an :data:`~llm_mdp.estimators.AGGREGATION_MODES` name.
        dynamic_sampling: DAPO's dynamic sampling: groups whose rewards are all equal are
            dropped and refilled (the draw is conditioned on a kept group).
        label: display name.
    """

    advantage: str = "reinforce"
    advantage_options: Mapping[str, Any] = field(default_factory=dict)
    group_size: int = 1
    inputs: InputSpec = field(default_factory=InputSpec)
    loss: str = "vanilla"
    loss_options: Mapping[str, Any] = field(default_factory=dict)
    correction: str = "none"
    cap: float = math.inf
    cap_low: float | None = None
    old: str = "target"
    aggregation: str = "seq-mean-token-sum"
    dynamic_sampling: bool = False
    label: str = ""

    def __post_init__(self) -> None:
        est.get_advantage_estimator(self.advantage)
        est.get_policy_loss(self.loss)
        offp.get_behavior_correction(self.correction)
        if self.old not in ("target", "behavior"):
            raise ValueError(f"old must be 'target' or 'behavior', got {self.old!r}")
        if self.aggregation not in est.AGGREGATION_MODES:
            raise ValueError(f"aggregation={self.aggregation!r}; known: {est.AGGREGATION_MODES}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        parts = [self.advantage, self.loss]
        if self.correction != "none":
            parts.append(f"{self.correction}(C={self.cap:g})")
        return "+".join(parts)


GROUP_LOCAL = frozenset({"reinforce", "rloo", "remax"})


def _group_aggregate(x: Tensor, m: Tensor, mode: str, max_len: int) -> Tensor:
    """``(n,)`` :func:`~llm_mdp.estimators.aggregate` of each group of ``x`` ``(n, G, H)``."""
    g = x.shape[1]
    x = torch.where(m, x, torch.zeros((), dtype=x.dtype))
    if mode == "seq-mean-token-sum":
        return x.sum((1, 2)) / g
    if mode == "seq-mean-token-mean":
        return (x.sum(2) / m.sum(2).clamp(min=1)).sum(1) / g
    if mode == "token-mean":
        return x.sum((1, 2)) / m.sum((1, 2)).clamp(min=1)
    return x.sum((1, 2)) / (g * max_len)


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class TruncationBias:
    """Bias of uncorrected REINFORCE under a truncating ``mu`` (top-k / top-p), exactly.

    Attributes:
        kept_mass: ``pi(kept responses)``, which is also ``E_mu[rho(W)]``.
        mean: ``(P,)`` the closed form ``sum_{W kept} pi(W) RM psi / prod_t Z(s_t)``.
        reweighting: ``(P,)`` ``sum_{W kept} pi(W) (1 / prod_t Z - 1) RM psi``: removed by ``rho(W)``.
        irreducible: ``(P,)`` ``-sum_{W not kept} pi(W) RM psi``: no importance weight removes it.
    """

    kept_mass: float
    mean: Tensor
    reweighting: Tensor
    irreducible: Tensor


class OffPolicyModel:
    """``model``'s policy ``pi`` trained on responses sampled from ``behavior``.

    Attributes:
        mu_prob: ``(N,)`` ``P_mu(W)`` (prompts uniform). ``logp_pi``, ``logp_mu``: ``(N, H)``
            per-token log-probs (0 on padding; ``logp_mu = -inf`` off ``mu``'s support).
        support: ``(N,)`` bool, ``mu(W) > 0``. ``covers``: ``mu > 0`` wherever ``pi > 0``.
    """

    def __init__(self, model: ExactModel, behavior: Behavior) -> None:
        tr = model.tree
        if behavior.log_mu.shape != model.log_pi.shape:
            raise ValueError(
                f"behavior table has shape {tuple(behavior.log_mu.shape)}, the tree needs "
                f"{tuple(model.log_pi.shape)}"
            )
        self.model, self.behavior = model, behavior
        self.logp_pi = model.log_pi.reshape(-1)[tr.pair].masked_fill(~tr.mask, 0.0)
        self.logp_mu = behavior.log_mu.reshape(-1)[tr.pair].masked_fill(~tr.mask, 0.0)
        n_prompts = len(tr.prompts)
        self.mu_prob = self.logp_mu.sum(1).exp() / n_prompts
        self.support = self.mu_prob > 0
        self.covers = bool(((model.pi > 0) <= behavior.kept).all())

    # ---------------------------------------------------------------- single responses
    def moments_of_weights(self, weights: Tensor) -> GradientMoments:
        """Exact moments under ``mu`` of ``sum_t weights_t grad log pi(w_t | s_t)`` (``(N, H)``)."""
        tr = self.model.tree
        w = torch.as_tensor(weights, dtype=F64).masked_fill(~tr.mask, 0.0)
        w = w.masked_fill(~self.support[:, None], 0.0)  # never sampled: any value, no weight
        dense = torch.zeros(tr.num_responses, tr.num_pairs, dtype=F64)
        dense.scatter_add_(1, tr.pair, w)
        return self._moments(dense, self.mu_prob, 1, None)

    def _moments(
        self, dense: Tensor, prob: Tensor, n_resp: int, draws: int | None
    ) -> GradientMoments:
        m = self.model
        mean = prob @ dense
        cov = dense.T @ (dense * prob[:, None]) - torch.outer(mean, mean)
        cov = (cov + cov.T) / 2
        return GradientMoments(
            mean=m.score.T @ mean,
            trace_cov=float((m.gram * cov).sum()),
            n_responses=n_resp,
            method="exact" if draws is None else "enumerated",
            num_draws=draws,
            stderr=None,
            pair_mean=mean,
            pair_cov=cov,
        )

    def sequence_ratio(self) -> Tensor:
        """``(N,)`` ``rho(W) = pi(W) / mu(W)`` on ``mu``'s support, 0 elsewhere."""
        log_rho = (self.logp_pi - self.logp_mu).sum(1)
        return torch.where(self.support, log_rho.exp(), torch.zeros((), dtype=F64))

    def sequence_is_target(self) -> Tensor:
        """``(P,)`` ``sum_{W : mu(W) > 0} pi(W) RM(W) psi(W)``: what ``rho(W) RM psi`` estimates.

        Equal to ``grad J(pi)`` exactly when ``mu`` covers ``pi``'s support.
        """
        m = self.model
        w = (m.rewards * self.support)[:, None] * m.tree.mask
        return self._pi_weighted(w)

    def _pi_weighted(self, w: Tensor) -> Tensor:
        """``sum_W pi(W) sum_t w_t psi_t`` for ``(N, H)`` weights (``pi``'s own expectation)."""
        return self.model.moments_of_weights(w).mean

    def truncation_bias(self) -> TruncationBias:
        """The closed form of uncorrected REINFORCE's mean under top-k / top-p (module docstring)."""
        if not self.behavior.truncation:
            raise ValueError(f"behavior {self.behavior.name!r} is not a top-k / top-p truncation")
        m, tr = self.model, self.model.tree
        kept_pairs = self.behavior.kept.reshape(-1)[tr.pair] | ~tr.mask
        kept_resp = kept_pairs.all(1)
        z_node = torch.where(self.behavior.kept, m.pi, torch.zeros((), dtype=F64)).sum(1)
        log_z = z_node[tr.node_of].log().masked_fill(~tr.mask, 0.0).sum(1)
        scale = torch.where(kept_resp, (-log_z).exp(), torch.zeros((), dtype=F64))
        base = m.rewards[:, None] * tr.mask
        mean = self._pi_weighted(base * scale[:, None])
        reweighting = self._pi_weighted(base * ((scale - 1.0) * kept_resp)[:, None])
        irreducible = -self._pi_weighted(base * (~kept_resp)[:, None])
        kept_mass = float((m.prob * kept_resp).sum())
        return TruncationBias(kept_mass, mean, reweighting, irreducible)

    # ---------------------------------------------------------------- estimators
    def _groups(self, g: int) -> tuple[Tensor, Tensor]:
        """Every ordered group of ``g`` responses of one prompt in ``mu``'s support:
        ``(idx (n, g), prob (n,))``."""
        tr = self.model.tree
        idx_all, prob_all = [], []
        for k in range(len(tr.prompts)):
            pool = ((tr.resp_prompt == k) & self.support).nonzero().squeeze(1)
            n = len(pool) ** g
            if n > MAX_GROUPS:
                raise ValueError(f"{n} groups of {g} to enumerate (max {MAX_GROUPS}); lower G")
            combos = torch.tensor(list(itertools.product(range(len(pool)), repeat=g)))
            idx = pool[combos.view(-1, g)]
            p_cond = self.mu_prob[idx] * len(tr.prompts)  # P_mu(W | prompt k)
            idx_all.append(idx)
            prob_all.append(p_cond.prod(1) / len(tr.prompts))
        return torch.cat(idx_all), torch.cat(prob_all)

    def _advantages(self, idx: Tensor, spec: OffPolicySpec) -> Tensor:
        """``(n, G, H)`` advantages of each group, one registry call per group unless the
        estimator is known to be a function of each group alone."""
        m, (n, g) = self.model, idx.shape
        espec = EstimatorSpec(
            spec.advantage, dict(spec.advantage_options), group_size=g, inputs=spec.inputs
        )
        local = spec.advantage in GROUP_LOCAL or (
            spec.advantage == "grpo" and spec.advantage_options.get("std_scaling") != "batch"
        )
        if local:
            return m.advantages(idx.reshape(-1), espec).view(n, g, -1)
        return torch.stack([m.advantages(row, espec) for row in idx])

    def draw_coefficients(self, idx: Tensor, spec: OffPolicySpec) -> Tensor:
        """``(n, n_pairs)`` coefficients of ``grad log pi`` in minus the gradient of each
        group's loss (``idx``: ``(n, G)`` responses)."""
        tr, (n, g) = self.model.tree, idx.shape
        rows = idx.reshape(-1)
        mask = tr.policy_mask[rows]  # the loss counts the policy's tokens only
        adv = self._advantages(idx, spec).reshape(n * g, -1)
        logp = self.logp_pi[rows].clone().requires_grad_(True)
        logp_mu = self.logp_mu[rows]
        old = logp.detach() if spec.old == "target" else logp_mu
        out = est.get_policy_loss(spec.loss)(logp, old, adv, mask, **dict(spec.loss_options))
        weights = offp.behavior_weights(
            spec.correction, logp.detach(), logp_mu, mask, cap=spec.cap, cap_low=spec.cap_low
        )
        loss = out.loss * weights
        per_group = _group_aggregate(
            loss.view(n, g, -1), mask.view(n, g, -1), spec.aggregation, tr.horizon
        )
        (grad,) = torch.autograd.grad(per_group.sum(), logp, allow_unused=True)
        coef = torch.zeros_like(logp) if grad is None else -grad
        coef = coef.masked_fill(~mask, 0.0).view(n, -1)
        dense = torch.zeros(n, tr.num_pairs, dtype=F64)
        return dense.scatter_add_(1, tr.pair[rows].view(n, -1), coef)

    def moments(self, spec: OffPolicySpec) -> GradientMoments:
        """Exact mean and covariance of one draw of ``spec`` under ``mu`` (every group enumerated)."""
        idx, prob = self._groups(spec.group_size)
        if spec.dynamic_sampling:
            r = self.model.rewards[idx]
            keep = (r != r[:, :1]).any(1)
            if not bool(keep.any()):
                raise ValueError("dynamic sampling keeps no group: every group's rewards are equal")
            idx, prob = idx[keep], prob[keep] / prob[keep].sum()
        dense = torch.cat(
            [self.draw_coefficients(idx[i : i + 4096], spec) for i in range(0, len(idx), 4096)]
        )
        return self._moments(dense, prob, spec.group_size, len(idx))

    def compare(self, moments: GradientMoments, target: Tensor | None = None) -> Comparison:
        """Against ``grad J(pi)`` (or ``target``)."""
        return self.model.compare(moments, target)
