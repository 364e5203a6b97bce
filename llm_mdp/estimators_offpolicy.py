"""Off-policy and sequence-level estimators of 2025-26, registered in :mod:`llm_mdp.estimators`.

Every function here is pure and follows the conventions of :mod:`llm_mdp.estimators`
(``(B, R)`` token tensors, right-padded ``mask``, outputs exactly 0 on padding). What
each one is unbiased for, and under which sampling, is in ``docs/estimators.md`` and
``docs/theory.md#off-policy``; the exact toolkit checks it
(:mod:`llm_mdp.theory.offpolicy`).

Policy losses (``POLICY_LOSSES``)
    ``gspo`` (GSPO, arXiv 2507.18071): the clipped surrogate on the length-normalised
    sequence ratio ``s(W) = (pi(W) / pi_old(W))^(1 / |W|)``; TRL's
    ``importance_sampling_level="sequence"``. ``cispo`` (MiniMax-M1, arXiv 2506.13585):
    ``-sg(clip(r_t)) A log pi``: the clipped importance weight is a constant, every token
    keeps its gradient. Clip-higher (DAPO, arXiv 2503.14476) is ``ppo_clip`` with
    ``clip_high > clip_low``.

Advantage estimators (``ADVANTAGE_ESTIMATORS``)
    ``reinforce_pp`` and ``reinforce_pp_baseline`` (REINFORCE++, arXiv 2501.03262).

Behavior corrections (:data:`BEHAVIOR_CORRECTIONS`)
    ``fn(logp, behavior_logp, mask, *, cap, cap_low) -> (B, R)`` detached weights that
    multiply the per-token loss, correcting for responses drawn from a behavior policy
    ``mu`` (inference engine, sampling temperature, top-k / top-p, a stale policy) rather
    than the trained ``pi``: token-level truncated IS ``tis`` (``min(rho_t, C)``), masked IS
    ``mis`` (``rho_t`` where ``C_low <= rho_t <= C``, else 0), and the sequence-level
    ``seq_tis`` / ``seq_mis`` on ``rho(W) = prod_t rho_t``, as TRL's
    ``vllm_importance_sampling_mode`` values ``token_truncate``, ``token_mask``,
    ``sequence_truncate``, ``sequence_mask``. Only the sequence ratio, untruncated, makes
    REINFORCE unbiased under ``mu`` (``docs/theory.md#off-policy``).

DAPO (arXiv 2503.14476)
    :func:`overlong_penalty` ("soft overlong punishment") and
    :func:`dynamic_sampling_keep` (which groups dynamic sampling keeps).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from llm_mdp.estimators import (
    AdvantageInputs,
    PolicyLossOutput,
    _float,
    _masked,
    _per_token,
    _ratio,
    _registrar,
    discounted_returns,
    register_advantage,
    register_policy_loss,
)

__all__ = [
    "BEHAVIOR_CORRECTIONS",
    "apply_behavior_correction",
    "behavior_weights",
    "cispo",
    "dynamic_sampling_keep",
    "get_behavior_correction",
    "gspo",
    "overlong_penalty",
    "register_behavior_correction",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "sequence_log_ratio",
]

CorrectionFn = Callable[..., Tensor]
BEHAVIOR_CORRECTIONS: dict[str, CorrectionFn] = {}


# ----------------------------------------------------------------------- policy losses


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """``(B,)`` GSPO's ``log s(W) = (1 / |W|) sum_t (log pi - log pi_old)``, old detached."""
    m = mask.bool()
    diff = _masked(logp - old_logp.detach(), m)
    return diff.sum(1) / m.sum(1).clamp(min=1).to(diff.dtype)


@register_policy_loss("gspo")
def gspo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float | None = 4e-4,
) -> PolicyLossOutput:
    """GSPO (arXiv 2507.18071, eq. (5)): ``max(-A s, -A clip(s, 1 - clip_low, 1 + clip_high))``.

    ``s(W) = exp(mean_t (log pi - log pi_old))`` is one ratio per response, placed on
    every token (``(B, R)``); its gradient is ``s(W) (1 / |W|) sum_t grad log pi``. With
    the paper's one term per sequence (``aggregation="seq-mean-token-mean"``) a response
    gets the weight ``A s`` on the *mean* of its token scores: at ``pi_old = pi`` and
    ``A = RM(W)`` that is REINFORCE re-weighted by ``1 / |W|``, biased for ``grad J``
    unless all responses have one length; with ``"seq-mean-token-sum"`` the ``|W|``
    copies cancel the ``1 / |W|`` and it is REINFORCE. Defaults: the paper's ``3e-4`` /
    ``4e-4``.
    """
    clip_high = clip_low if clip_high is None else clip_high
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0; got {clip_low}, {clip_high}")
    adv = advantages.detach()
    log_s = sequence_log_ratio(logp, old_logp, mask).clamp(-20.0, 20.0)
    s = _per_token(torch.exp(log_s), mask)
    unclipped = -adv * s
    clipped = -adv * s.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    stats = {"ratio": s.detach(), "clipped": (clipped > unclipped).to(s.dtype)}
    return PolicyLossOutput(_masked(loss, mask), {k: _masked(v, mask) for k, v in stats.items()})


@register_policy_loss("cispo")
def cispo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_high: float = 4.0,
    clip_low: float | None = None,
) -> PolicyLossOutput:
    """CISPO (MiniMax-M1, arXiv 2506.13585): ``-sg(clip(r, 1 - clip_low, 1 + clip_high)) A log pi``.

    ``r = pi / pi_old`` per token; the clipped weight is a constant (stop-gradient), so
    no token loses its gradient (PPO's clip zeroes it), and the per-sample gradient is
    ``sum_t clip(r_t) A grad log pi``. ``clip_low=None`` (the paper's choice) leaves the
    lower side open. TRL's ``loss_type="cispo"`` with ``epsilon_high = e`` is
    ``clip_high = e - 1``. On-policy (``r = 1``, within the clip) it is the vanilla
    policy gradient, so its bias is that of the advantage.
    """
    if clip_high < 0.0 or (clip_low is not None and not 0.0 <= clip_low <= 1.0):
        raise ValueError(f"need clip_high >= 0 and 0 <= clip_low <= 1; got {clip_high}, {clip_low}")
    ratio = _ratio(logp, old_logp, mask)
    low = 0.0 if clip_low is None else 1.0 - clip_low
    weight = ratio.detach().clamp(low, 1.0 + clip_high)
    loss = -weight * advantages.detach() * _masked(logp, mask)
    clipped = (weight != ratio.detach()).to(ratio.dtype)
    stats = {"ratio": ratio.detach(), "clipped": clipped}
    return PolicyLossOutput(_masked(loss, mask), {k: _masked(v, mask) for k, v in stats.items()})


# ------------------------------------------------------------------ advantage estimators


def _token_normalize(x: Tensor, mask: Tensor, eps: float) -> Tensor:
    """``(x - mean) / (std + eps)`` over the real tokens of the whole batch (Bessel std)."""
    m = mask.bool()
    vals = x[m]
    if vals.numel() < 2:
        return _masked(x - vals.mean() if vals.numel() else x, m)
    return _masked((x - vals.mean()) / (vals.std() + eps), m)


def _return_to_go(batch: AdvantageInputs, centred: Tensor | None = None) -> Tensor:
    """Per-token return-to-go: of ``token_rewards`` when given, else ``RM(W)`` on every token."""
    if batch.token_rewards is None:
        r = _float(batch.rewards) if centred is None else centred
        return _per_token(r, batch.mask)
    g = discounted_returns(batch.token_rewards, batch.mask, batch.gamma)
    if centred is not None:  # subtract the same group baseline from every token's return
        g = g - _per_token(_float(batch.rewards) - centred, batch.mask)
    return g


@register_advantage("reinforce_pp")
def reinforce_pp(batch: AdvantageInputs, *, eps: float = 1e-8) -> Tensor:
    """REINFORCE++ (arXiv 2501.03262): return-to-go, normalised over the batch.

    ``A_t = (G_t - mean) / (std + eps)``, mean and std over every real token of the batch;
    ``G_t`` is the return-to-go of ``token_rewards`` when the batch has them (the paper
    puts ``-beta KL`` on every token and ``RM`` on the last one), else ``RM(W)``. The
    batch normalisation makes it biased by a data-dependent scale (the std) and by the
    sample's own share of the mean, like GRPO's std scaling.
    """
    return _token_normalize(_return_to_go(batch), batch.mask, eps)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(batch: AdvantageInputs, *, eps: float = 1e-8) -> Tensor:
    """REINFORCE++-baseline (arXiv 2501.03262): group mean, then batch std.

    ``A = (R_i - mean_group) / (std_batch + eps)``, the group mean including the sample
    (like GRPO, a ``(G - 1) / G`` shrinkage before the std), the std over every real token
    of the batch (not per group, so one easy prompt does not blow up its own scale).
    """
    r = batch.grouped_rewards("reinforce_pp_baseline")
    centred = (r - r.mean(1, keepdim=True)).reshape(-1)
    adv = _return_to_go(batch, centred)
    m = batch.mask.bool()
    vals = adv[m]
    std = vals.std() if vals.numel() > 1 else torch.ones((), dtype=adv.dtype)
    return _masked(adv / (std + eps), m)


# ------------------------------------------------------------------- behavior corrections


def register_behavior_correction(
    name: str, *, overwrite: bool = False
) -> Callable[[CorrectionFn], CorrectionFn]:
    """Decorator registering ``fn(logp, behavior_logp, mask, *, cap, cap_low) -> (B, R)``."""
    return _registrar(BEHAVIOR_CORRECTIONS, "behavior correction", name, overwrite)


def get_behavior_correction(name: str) -> CorrectionFn:
    if name not in BEHAVIOR_CORRECTIONS:
        known = ", ".join(sorted(BEHAVIOR_CORRECTIONS))
        raise ValueError(f"unknown behavior correction {name!r}; known: {known}")
    return BEHAVIOR_CORRECTIONS[name]


def _token_log_rho(logp: Tensor, behavior_logp: Tensor, mask: Tensor) -> Tensor:
    return _masked(logp.detach() - behavior_logp.detach(), mask)


def _check_caps(cap: float, cap_low: float | None) -> None:
    if not cap > 0 or (cap_low is not None and not 0 <= cap_low <= cap):
        raise ValueError(f"need cap > 0 and 0 <= cap_low <= cap; got cap={cap}, cap_low={cap_low}")


@register_behavior_correction("none")
def no_correction(
    logp: Tensor,
    behavior_logp: Tensor,
    mask: Tensor,
    *,
    cap: float = math.inf,
    cap_low: float | None = None,
) -> Tensor:
    """Weight 1 on every real token: the responses are treated as if drawn from ``pi``."""
    return _masked(torch.ones_like(logp.detach()), mask)


@register_behavior_correction("tis")
def tis(
    logp: Tensor,
    behavior_logp: Tensor,
    mask: Tensor,
    *,
    cap: float = 2.0,
    cap_low: float | None = None,
) -> Tensor:
    """Token-level truncated IS: ``clamp(rho_t, cap_low, cap)``, ``rho_t = pi / mu`` of the token.

    Re-weights each token's action only, not the distribution of its prefix nor of the
    continuation that produced ``RM(W)``: biased for ``grad J`` even with ``cap = inf``.
    """
    _check_caps(cap, cap_low)
    rho = torch.exp(_token_log_rho(logp, behavior_logp, mask).clamp(max=50.0))
    return _masked(rho.clamp(min=cap_low, max=cap), mask)


@register_behavior_correction("mis")
def mis(
    logp: Tensor,
    behavior_logp: Tensor,
    mask: Tensor,
    *,
    cap: float = 2.0,
    cap_low: float | None = None,
) -> Tensor:
    """Token-level masked IS: ``rho_t`` where ``cap_low <= rho_t <= cap``, else 0 (that token
    gets no gradient). Biased like :func:`tis`, plus the mass of the masked tokens."""
    _check_caps(cap, cap_low)
    rho = torch.exp(_token_log_rho(logp, behavior_logp, mask).clamp(max=50.0))
    keep = (rho <= cap) & (rho >= (0.0 if cap_low is None else cap_low))
    return _masked(torch.where(keep, rho, torch.zeros_like(rho)), mask)


def _sequence_rho(logp: Tensor, behavior_logp: Tensor, mask: Tensor) -> Tensor:
    return torch.exp(_token_log_rho(logp, behavior_logp, mask).sum(1).clamp(max=50.0))


@register_behavior_correction("seq_tis")
def seq_tis(
    logp: Tensor,
    behavior_logp: Tensor,
    mask: Tensor,
    *,
    cap: float = 2.0,
    cap_low: float | None = None,
) -> Tensor:
    """Sequence-level truncated IS: ``clamp(rho(W), cap_low, cap)`` on every token of ``W``.

    With ``cap = inf`` REINFORCE is exactly unbiased for ``grad J(pi)`` under any ``mu``
    that covers ``pi``'s support; the truncation bias vanishes once ``cap >= max rho``.
    """
    _check_caps(cap, cap_low)
    rho = _sequence_rho(logp, behavior_logp, mask).clamp(min=cap_low, max=cap)
    return _per_token(rho, mask)


@register_behavior_correction("seq_mis")
def seq_mis(
    logp: Tensor,
    behavior_logp: Tensor,
    mask: Tensor,
    *,
    cap: float = 2.0,
    cap_low: float | None = None,
) -> Tensor:
    """Sequence-level masked IS: ``rho(W)`` where ``cap_low <= rho(W) <= cap``, else 0."""
    _check_caps(cap, cap_low)
    rho = _sequence_rho(logp, behavior_logp, mask)
    keep = (rho <= cap) & (rho >= (0.0 if cap_low is None else cap_low))
    return _per_token(torch.where(keep, rho, torch.zeros_like(rho)), mask)


def behavior_weights(
    name: str,
    logp: Tensor,
    behavior_logp: Tensor,
    mask: Tensor,
    *,
    cap: float = 2.0,
    cap_low: float | None = None,
) -> Tensor:
    """``(B, R)`` detached correction weights of a registered behavior correction."""
    return get_behavior_correction(name)(logp, behavior_logp, mask, cap=cap, cap_low=cap_low)


def apply_behavior_correction(
    out: PolicyLossOutput, weights: Tensor, mask: Tensor
) -> PolicyLossOutput:
    """Multiply a per-token policy loss by detached correction ``weights`` (as TRL does)."""
    stats = dict(out.stats)
    stats["behavior_weight"] = _masked(weights.detach(), mask)
    return PolicyLossOutput(_masked(out.loss * weights.detach(), mask), stats)


# ------------------------------------------------------------------------------- DAPO


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476), ``(B,)`` float.

    0 for ``|W| <= max_len - cache_len``, ``(max_len - cache_len - |W|) / cache_len`` in
    the last ``cache_len`` tokens, -1 beyond ``max_len``. Added to ``RM(W)``: a reward
    change, so the gradient stays unbiased for the penalised objective.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len; got {cache_len}, {max_len}")
    n = _float(lengths)
    soft = (max_len - cache_len - n) / cache_len
    out = torch.where(n <= max_len - cache_len, torch.zeros_like(n), soft)
    return torch.where(n > max_len, -torch.ones_like(n), out)


def dynamic_sampling_keep(rewards: Tensor, group_size: int) -> Tensor:
    """``(B // G,)`` bool: the groups DAPO's dynamic sampling keeps (rewards not all equal).

    A group whose rewards are all equal has zero group-centred advantage, so dropping it
    changes no gradient; refilling the batch with kept groups divides the expected
    gradient of a per-group estimator by ``P(keep)`` (a per-prompt learning rate).
    """
    b = len(rewards)
    if group_size < 2 or b % group_size:
        raise ValueError(f"need group_size >= 2 dividing B; got group_size={group_size}, B={b}")
    r = rewards.view(b // group_size, group_size)
    return (r != r[:, :1]).any(dim=1)
