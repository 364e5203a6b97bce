"""Advantage, KL and policy-loss estimators and loss aggregation, as registered pure torch functions.

Every agent (REINFORCE, RLOO, ReMax, GRPO, PPO, TRePO) and the exact theory toolkit use
these functions; equation numbers are those of He et al., arXiv 2506.02553, stated in
``docs/theory.md``.

Conventions
-----------
* Token tensors are ``(B, R)``: ``B`` responses, ``R`` = padded response length. ``mask``
  is ``(B, R)``, bool or 0/1 float, 1 on real response tokens (EOS included). Every
  ``(B, R)`` output is exactly 0 where the mask is 0 (padding may hold garbage or NaN).
* Position ``t`` is 1-based in the math and column ``t - 1`` in tensors; the state
  ``s_t`` is the prompt plus the tokens before ``t``. ``rewards`` are response-level
  ``RM(W)``, shape ``(B,)``.
* Groups are contiguous: with ``group_size=G`` rows ``[g*G, (g+1)*G)`` share one prompt.

Registries and their one signature each (add your own with the decorators)
-----------------------------------------------------------------------------
* ``ADVANTAGE_ESTIMATORS``: ``fn(batch: AdvantageInputs, **options) -> Tensor (B, R)``,
  the per-token weight of ``grad log pi(w_t | s_t)``. :func:`register_advantage` runs the
  function under ``torch.no_grad()`` and detaches its output: advantages never carry
  gradient. Unknown options raise ``TypeError`` (options are keyword-only parameters).
* ``KL_ESTIMATORS``: ``fn(logp, ref_logp, mask=None) -> Tensor (B, R)``.
* ``POLICY_LOSSES``: ``fn(logp, old_logp, advantages, mask, **options) -> PolicyLossOutput``.
* ``ADVANTAGE_TRANSFORMS``: ``fn(advantages, mask, *, all_reduce=None, **options) -> Tensor
  (B, R)``, applied to an estimator's output (PPO's ``"whiten"``). ``all_reduce`` sums a
  tensor over data-parallel ranks, so a batch statistic is the global batch's.

Losses are per token; :func:`aggregate` turns them into a scalar (section "Aggregation").
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

AdvantageFn = Callable[..., Tensor]
KLFn = Callable[..., Tensor]
PolicyLossFn = Callable[..., "PolicyLossOutput"]
AdvantageTransformFn = Callable[..., Tensor]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}
KL_ESTIMATORS: dict[str, KLFn] = {}
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
ADVANTAGE_TRANSFORMS: dict[str, AdvantageTransformFn] = {}


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _registrar(table: dict[str, Any], kind: str, name: str, overwrite: bool) -> Decorator:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in table and not overwrite:
            raise ValueError(f"{kind} {name!r} is already registered (pass overwrite=True)")
        table[name] = fn
        return fn

    return deco


def _lookup(table: dict[str, Any], kind: str, name: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def register_advantage(name: str, *, overwrite: bool = False) -> Decorator:
    """Decorator registering ``fn(batch, **options) -> (B, R)``, wrapped to run without grad."""
    register = _registrar(ADVANTAGE_ESTIMATORS, "advantage estimator", name, overwrite)

    def deco(fn: AdvantageFn) -> AdvantageFn:
        @functools.wraps(fn)
        def no_grad_fn(batch: AdvantageInputs, **options: Any) -> Tensor:
            with torch.no_grad():
                return fn(batch, **options).detach()

        return register(no_grad_fn)

    return deco


def register_kl_estimator(name: str, *, overwrite: bool = False) -> Decorator:
    """Decorator registering ``fn(logp, ref_logp, mask=None) -> (B, R)``."""
    return _registrar(KL_ESTIMATORS, "KL estimator", name, overwrite)


def register_policy_loss(name: str, *, overwrite: bool = False) -> Decorator:
    """Decorator registering ``fn(logp, old_logp, advantages, mask, **options)``."""
    return _registrar(POLICY_LOSSES, "policy loss", name, overwrite)


def register_advantage_transform(name: str, *, overwrite: bool = False) -> Decorator:
    """Decorator registering ``fn(advantages, mask, *, all_reduce=None, **options) -> (B, R)``."""
    return _registrar(ADVANTAGE_TRANSFORMS, "advantage transform", name, overwrite)


def get_advantage_estimator(name: str) -> AdvantageFn:
    return _lookup(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def get_kl_estimator(name: str) -> KLFn:
    return _lookup(KL_ESTIMATORS, "KL estimator", name)


def get_policy_loss(name: str) -> PolicyLossFn:
    return _lookup(POLICY_LOSSES, "policy loss", name)


def get_advantage_transform(name: str) -> AdvantageTransformFn:
    return _lookup(ADVANTAGE_TRANSFORMS, "advantage transform", name)


def compute_advantages(name: str, batch: AdvantageInputs, **options: Any) -> Tensor:
    """``get_advantage_estimator(name)(batch, **options)``: ``(B, R)``, no grad."""
    return get_advantage_estimator(name)(batch, **options)


# ----------------------------------------------------------------------------- helpers


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where ``mask``, exactly 0 elsewhere (NaN-safe, unlike ``x * mask``)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _per_token(weights: Tensor, mask: Tensor) -> Tensor:
    """Broadcast a response-level weight ``(B,)`` to every real token ``(B, R)``."""
    return _masked(_float(weights)[:, None].expand(mask.shape), mask)


@dataclass(frozen=True)
class AdvantageInputs:
    """Everything an advantage estimator may read; only ``rewards`` and ``mask`` are required.

    Attributes:
        rewards: ``(B,)`` response-level rewards ``RM(W)``.
        mask: ``(B, R)`` response mask (right-padded where an estimator needs it: ``trepo``).
        group_size: ``G``, responses per prompt, groups contiguous.
        token_rewards: ``(B, R)`` per-token rewards (``gae``); see :func:`zra_token_rewards`.
        values: ``(B, R)`` critic ``V(s_t)`` at column ``t - 1`` (``gae``).
        baseline: ``(B,)`` prompt-level baseline, e.g. ReMax's greedy reward.
        prefix_values: ``(B, R + 1)`` Monte Carlo ``V_hat(s_1 .. s_{T+1})`` (``trepo``);
            column ``T`` (``s_{T+1}``) is the terminal value, always taken from ``rewards``.
        prefix_known: ``(B, R + 1)`` bool, which ``prefix_values`` entries were estimated.
        next_values: ``(B, R)`` optional independent estimates of ``V_hat(s_{t+1})`` (``trepo``).
        gamma: discount of the token MDP (default of ``gae``'s ``gamma`` option). The
            response-level estimators ignore it: by Theorem 1 (21) ``RM(W)`` already is the
            discounted return, so the weight ``RM(W)`` is unbiased for every gamma.
    """

    rewards: Tensor
    mask: Tensor
    group_size: int = 1
    token_rewards: Tensor | None = None
    values: Tensor | None = None
    baseline: Tensor | None = None
    prefix_values: Tensor | None = None
    prefix_known: Tensor | None = None
    next_values: Tensor | None = None
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if self.rewards.dim() != 1 or self.mask.dim() != 2 or len(self.rewards) != len(self.mask):
            raise ValueError(
                f"rewards must be (B,) and mask (B, R); got {tuple(self.rewards.shape)} "
                f"and {tuple(self.mask.shape)}"
            )
        b, r = self.mask.shape
        shapes: dict[str, tuple[int, ...]] = {"token_rewards": (b, r), "values": (b, r)}
        shapes |= {"next_values": (b, r), "baseline": (b,)}
        shapes |= {"prefix_values": (b, r + 1), "prefix_known": (b, r + 1)}
        for name, shape in shapes.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")

    def require(self, name: str, estimator: str) -> Tensor:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"advantage estimator {estimator!r} needs AdvantageInputs.{name}")
        return value

    def grouped_rewards(self, estimator: str) -> Tensor:
        """Rewards as ``(B // G, G)``; needs ``G >= 2`` and ``B % G == 0``."""
        b, g = len(self.rewards), self.group_size
        if g < 2 or b % g:
            raise ValueError(
                f"{estimator!r} needs group_size >= 2 dividing the batch; got group_size={g}, B={b}"
            )
        return _float(self.rewards).view(b // g, g)


# ------------------------------------------------------------------ advantage estimators


@register_advantage("reinforce")
def reinforce(batch: AdvantageInputs) -> Tensor:
    """REINFORCE, Theorem 1 (21): weight ``R_i - b_i`` on every token; ``b = baseline`` or 0.

    Unbiased for any prompt-level baseline (Lemma 2).
    """
    rewards = _float(batch.rewards)
    return _per_token(rewards if batch.baseline is None else rewards - batch.baseline, batch.mask)


@register_advantage("rloo")
def rloo(batch: AdvantageInputs) -> Tensor:
    """RLOO (Ahmadian et al., arXiv 2402.14740): ``R_i - mean_{j != i in group} R_j``. Unbiased.

    Equals ``G / (G - 1)`` times the group-centred reward, so it sums to 0 over a group.
    """
    r = batch.grouped_rewards("rloo")
    g = r.shape[1]
    return _per_token((r - (r.sum(1, keepdim=True) - r) / (g - 1)).reshape(-1), batch.mask)


@register_advantage("remax")
def remax(batch: AdvantageInputs) -> Tensor:
    """ReMax (Li et al., arXiv 2310.10505): ``R_i - baseline_i``, baseline = greedy reward."""
    return _per_token(_float(batch.rewards) - batch.require("baseline", "remax"), batch.mask)


@register_advantage("grpo")
def grpo(batch: AdvantageInputs, *, std_scaling: str = "group", eps: float = 1e-6) -> Tensor:
    """GRPO (DeepSeekMath, arXiv 2402.03300): ``(R_i - mean_group) / (std + eps)``.

    ``std_scaling``: ``"group"`` (per-group std), ``"batch"`` (std over all ``B`` rewards,
    group mean kept, TRL's ``scale_rewards="batch"``) or ``"none"`` (Dr. GRPO, arXiv
    2503.20783: mean only, ``(G - 1) / G`` times RLOO, biased by exactly that factor). The
    std uses Bessel's correction (``torch.std``, as TRL and verl). ``G >= 2`` is required.
    """
    if std_scaling not in ("group", "batch", "none"):
        raise ValueError(f"std_scaling must be 'group', 'batch' or 'none', got {std_scaling!r}")
    r = batch.grouped_rewards("grpo")
    adv = r - r.mean(1, keepdim=True)
    if std_scaling == "group":
        adv = adv / (r.std(1, keepdim=True) + eps)
    elif std_scaling == "batch":
        adv = adv / (r.std() + eps)
    return _per_token(adv.reshape(-1), batch.mask)


def zra_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """Zero-Reward Assumption: ``RM(W)`` on the last real token, 0 elsewhere.

    See ``docs/theory.md#the-token-mdp``.
    """
    m = mask.bool()
    cols = torch.arange(m.shape[1], device=m.device)
    last = torch.where(m, cols, -1).max(dim=1).values
    rows = torch.nonzero(last >= 0).squeeze(1)
    out = torch.zeros(m.shape, dtype=_float(rewards).dtype, device=rewards.device)
    out[rows, last[rows]] = _float(rewards)[rows]
    return out


def compute_gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[Tensor, Tensor]:
    """GAE (Schulman et al., arXiv 1506.02438): returns ``(advantages, returns)``, both ``(B, R)``.

    ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)``, ``A_t = delta_t + gamma lam A_{t+1}``; the
    value after the last real token is 0 (the response is scored, so the episode ends).
    Masked-out columns are skipped, not treated as steps. ``returns = A + V`` is the
    lambda-return, the critic's target. No gradient flows (``values`` is detached). With
    ZRA rewards and ``gamma = lam = 1``: ``A_t = RM(W) - V(s_t)``
    (``docs/theory.md#estimators``).
    """
    m = mask.bool()
    dtype = torch.promote_types(_float(values).dtype, token_rewards.dtype)
    values, token_rewards = values.detach().to(dtype), token_rewards.detach().to(dtype)
    adv = torch.zeros_like(values)
    next_value = next_adv = torch.zeros_like(values[:, 0])
    for c in reversed(range(m.shape[1])):
        a = token_rewards[:, c] + gamma * next_value - values[:, c] + gamma * lam * next_adv
        next_adv = torch.where(m[:, c], a, next_adv)
        next_value = torch.where(m[:, c], values[:, c], next_value)
        adv[:, c] = _masked(a, m[:, c])
    return adv, _masked(adv + values, m)


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Return-to-go ``G_t = sum_{k >= t} gamma^(k-t) r_k`` over real tokens, ``(B, R)``."""
    rewards = _float(token_rewards)
    return compute_gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[0]


@register_advantage("gae")
def gae(batch: AdvantageInputs, *, gamma: float | None = None, lam: float = 1.0) -> Tensor:
    """PPO's GAE advantages (arXiv 1506.02438, 1707.06347) over ``token_rewards`` and ``values``.

    ``gamma`` defaults to ``batch.gamma``. Under ZRA keep ``gamma = 1`` (eq. (26): gamma < 1
    re-weights position t by ``(1/gamma)^(t-1)``); ``lam = 1`` is unbiased for exact V.
    Use :func:`compute_gae` directly for the value targets.
    """
    token_rewards = batch.require("token_rewards", "gae (build them with zra_token_rewards)")
    values = batch.require("values", "gae")
    return compute_gae(
        token_rewards, values, batch.mask, batch.gamma if gamma is None else gamma, lam
    )[0]


def _interpolate(values: Tensor, known: Tensor, linear: bool) -> Tensor:
    """Fill unknown columns from the known ones; column 0 of every row must be known."""
    n = values.shape[1]
    cols = torch.arange(n, device=values.device).expand_as(known)
    prev = torch.where(known, cols, -1).cummax(dim=1).values
    v_prev = values.gather(1, prev)
    if not linear:
        return v_prev
    nxt = torch.where(known, cols, n).flip(1).cummin(dim=1).values.flip(1)
    nxt = torch.where(nxt < n, nxt, prev)  # nothing known to the right: stay constant
    frac = (cols - prev).to(values.dtype) / (nxt - prev).clamp(min=1).to(values.dtype)
    return v_prev + frac * (values.gather(1, nxt) - v_prev)


@register_advantage("trepo")
def trepo(batch: AdvantageInputs, *, interpolation: str = "linear") -> Tensor:
    """TRePO: ``A_t = V_hat(s_{t+1}) - V_hat(s_t)``.

    ``docs/theory.md#trepo``; VinePPO, arXiv 2410.01679.

    Theorem 2 (28). ``V_hat`` over columns ``0..T`` of ``prefix_values`` (column ``j`` =
    ``s_{j+1}``): entries with ``prefix_known`` are Monte Carlo estimates; the terminal
    column ``T`` is ``RM(W) = rewards`` (always known, whatever ``prefix_values``/``prefix_known``
    hold there); columns past ``T`` are ignored; unknown entries may hold anything (NaN too).
    Column 0, ``V_hat(s_1)``, must be known in every non-empty row (``ValueError`` otherwise).
    Unknown columns are filled by ``interpolation``: ``"linear"`` in the position between
    the nearest known columns, or ``"constant"`` (carry the last known value forward).
    The mask must be right-padded (``T`` = number of real tokens).

    Without ``next_values`` the weights telescope: ``sum_t A_t = RM(W) - V_hat(s_1)`` for
    either interpolation; with every column known this is the all-positions MC estimator
    (unbiased). ``next_values[:, t-1]``, if given, is an estimate of ``V_hat(s_{t+1})``
    independent of the one in ``prefix_values`` (fresh rollouts, so the two terms of
    ``A_t`` come from independent samples); it replaces ``V_hat(s_{t+1})`` in ``A_t`` only
    where ``s_t`` and ``s_{t+1}`` are both known and ``s_{t+1}`` is not terminal (there the
    exact ``RM(W)`` is used). Elsewhere it is ignored; telescoping then holds only in
    expectation.
    """
    if interpolation not in ("linear", "constant"):
        raise ValueError(f"interpolation must be 'linear' or 'constant', got {interpolation!r}")
    m = batch.mask.bool()
    prefix_values = _float(batch.require("prefix_values", "trepo"))
    rewards = batch.rewards.to(torch.promote_types(prefix_values.dtype, batch.rewards.dtype))
    prefix_known = batch.require("prefix_known", "trepo").bool()
    lengths = m.sum(dim=1)
    cols = torch.arange(m.shape[1] + 1, device=m.device)[None, :]
    if not torch.equal(m, cols[:, :-1] < lengths[:, None]):
        raise ValueError("trepo needs a right-padded mask (real tokens first in every row)")
    missing = torch.nonzero((lengths > 0) & ~prefix_known[:, 0]).squeeze(1)
    if len(missing):
        raise ValueError(
            f"trepo needs prefix_known[:, 0] (V_hat(s_1)); missing in rows {missing.tolist()}"
        )
    terminal = cols == lengths[:, None]
    known = (prefix_known & (cols < lengths[:, None])) | terminal
    v = torch.where(terminal, rewards[:, None], _masked(prefix_values, known))
    v = _interpolate(v, known, linear=interpolation == "linear")
    v_next = v[:, 1:]
    if batch.next_values is not None:
        fresh = known[:, :-1] & known[:, 1:] & ~terminal[:, 1:]
        v_next = torch.where(fresh, batch.next_values.to(v.dtype), v_next)
    return _masked(v_next - v[:, :-1], m)


# ------------------------------------------------------------------ advantage transforms


@register_advantage_transform("whiten")
def whiten(
    advantages: Tensor,
    mask: Tensor,
    *,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """``(A - mean) / (std + eps)`` over the real tokens of the batch (PPO's whitening).

    Mean and unbiased std are over every token with ``mask`` set, on every rank when
    ``all_reduce`` (a sum over ranks) is given: the result does not depend on how the
    batch is split. Computed in float64, returned in ``advantages``' dtype, 0 on padding.

    Not an unbiased estimator of ``grad J`` any more (``docs/theory.md#estimators``):
    subtracting the batch mean is a baseline that depends on the sample, and dividing by
    the std rescales the step; both are what PPO implementations do.
    """
    m = mask.bool()
    a = advantages[m].double()
    n = torch.tensor(float(a.numel()), dtype=a.dtype, device=a.device)
    sums = torch.stack([a.sum(), (a * a).sum(), n])
    if all_reduce is not None:
        sums = all_reduce(sums)
    mean = sums[0] / sums[2].clamp(min=1)
    var = (sums[1] - sums[2] * mean**2) / (sums[2] - 1).clamp(min=1)
    out = (advantages.double() - mean) / (var.clamp(min=0).sqrt() + eps)
    return torch.where(m, out, 0.0).to(advantages.dtype)


# ------------------------------------------------------------------------ KL estimators


def _log_ratio(logp: Tensor, ref_logp: Tensor, mask: Tensor | None) -> Tensor:
    x = logp - ref_logp.detach()
    return x if mask is None else _masked(x, mask)


@register_kl_estimator("k1")
def k1(logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """k1 = ``x = log pi - log pi_ref`` (Schulman, "Approximating KL divergence").

    Unbiased for KL(pi || pi_ref), can be negative. In the reward (:func:`kl_in_reward`) it
    gives the unbiased gradient of the reverse KL; in the loss its gradient is ``grad logp``,
    zero in expectation.
    """
    return _log_ratio(logp, ref_logp, mask)


@register_kl_estimator("k2")
def k2(logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """k2 = ``x^2 / 2``: biased, low variance; in the loss its gradient is ``x grad logp``."""
    return _log_ratio(logp, ref_logp, mask).pow(2) / 2


@register_kl_estimator("k3")
def k3(logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """k3 = ``exp(-x) - 1 + x = rho - 1 - log rho`` with ``rho = pi_ref / pi``; always >= 0.

    Unbiased for KL(pi || pi_ref). In the loss (GRPO's choice) its gradient is
    ``(1 - rho) grad logp``, which is not the reverse-KL gradient.
    """
    x = _log_ratio(logp, ref_logp, mask)
    return torch.exp(-x) - 1 + x


def compute_kl(name: str, logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token KL estimate ``(B, R)`` by registered name; differentiable through ``logp``."""
    return get_kl_estimator(name)(logp, ref_logp, mask)


def kl_in_reward(
    token_rewards: Tensor, kl: Tensor, beta: float, mask: Tensor | None = None
) -> Tensor:
    """KL in the reward: ``token_rewards - beta * kl`` with ``kl`` detached (``(B, R)``).

    The loss placement needs no helper: ``loss = pg_loss + beta * aggregate(kl, mask, mode)``
    with ``kl = compute_kl(name, logp, ref_logp, mask)``.
    """
    out = token_rewards - beta * kl.detach()
    return out if mask is None else _masked(out, mask)


# ----------------------------------------------------------------------- policy losses


@dataclass(frozen=True)
class PolicyLossOutput:
    """Per-token policy loss and diagnostics.

    Attributes:
        loss: ``(B, R)`` differentiable per-token loss, 0 on padding; reduce it with
            :func:`aggregate`.
        stats: detached ``(B, R)`` per-token diagnostics, 0 on padding: always ``"ratio"``;
            ``ppo_clip`` adds 0/1 floats ``"clipped"`` (the clip branch is active, no
            gradient) and ``"dual_clipped"``. Aggregate them, e.g. with ``"token-mean"``.
    """

    loss: Tensor
    stats: dict[str, Tensor]


def _ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """``pi / pi_old = exp(logp - old_logp)``, old detached, log-ratio clamped to [-20, 20]."""
    return torch.exp(_masked(logp - old_logp.detach(), mask).clamp(-20.0, 20.0))


@register_policy_loss("vanilla")
def vanilla(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> PolicyLossOutput:
    """Policy gradient surrogate ``-A * ratio``; at ``old_logp == logp`` its gradient is
    ``-A grad logp``, the estimator of Lemma 1 (4) / Theorem 1 (21). ``A`` is detached."""
    ratio = _ratio(logp, old_logp, mask)
    loss = _masked(-advantages.detach() * ratio, mask)
    return PolicyLossOutput(loss, {"ratio": _masked(ratio.detach(), mask)})


@register_policy_loss("ppo_clip")
def ppo_clip(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate (arXiv 1707.06347): ``max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``.

    ``clip_high`` defaults to ``clip_low``; a larger one is DAPO's asymmetric "clip higher".
    ``dual_clip = c > 1`` (Ye et al., arXiv 1912.09729) caps the loss at ``-c A`` when
    ``A < 0``, so a huge ratio cannot blow up a negative-advantage token.
    """
    clip_high = clip_low if clip_high is None else clip_high
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0; got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    adv = advantages.detach()
    ratio = _ratio(logp, old_logp, mask)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        dual = (adv < 0) & (loss > -adv * dual_clip)
        loss = torch.where(dual, -adv * dual_clip, loss)
    stats = {
        "ratio": ratio.detach(),
        "clipped": (clipped > unclipped) & ~dual,
        "dual_clipped": dual,
    }
    stats = {k: _masked(v.to(ratio.dtype), mask) for k, v in stats.items()}
    return PolicyLossOutput(_masked(loss, mask), stats)


# ------------------------------------------------------------------------- aggregation

AGGREGATION_MODES = (
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "token-mean",
    "seq-mean-token-sum-norm",
)


def aggregate(
    token_values: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_sequences: float | Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    max_len: float | None = None,
) -> Tensor:
    """Reduce a per-token ``(B, R)`` quantity to a scalar; names as in TRL / verl.

    * ``"seq-mean-token-sum"``: ``sum_{i,t} x / N``. With ``x = -A logp`` this is the
      unbiased estimate of ``-grad J`` (sum over tokens, mean over sequences).
    * ``"seq-mean-token-mean"``: ``sum_i (sum_t x / T_i) / N`` (original GRPO);
      re-weights by ``1 / T_i``. Rows with ``T_i = 0`` contribute 0.
    * ``"token-mean"``: ``sum_{i,t} x / num_tokens`` (DAPO, TRL default).
    * ``"seq-mean-token-sum-norm"``: ``sum_{i,t} x / (N * max_len)`` (Dr. GRPO, as in TRL's
      ``dr_grpo``; verl divides by ``max_len`` only). ``max_len`` defaults to ``R``: pass
      a constant (the generation cap) when batches are padded differently.

    ``N = num_sequences`` and ``num_tokens`` default to this batch's ``B`` and mask sum.
    Micro-batching / data parallel: every mode is a sum over rows of a per-row term
    divided by a constant, so splitting the rows of a batch into parts and summing the
    part losses gives exactly the full-batch loss (and gradient) when every part gets the
    full batch's ``num_sequences`` (seq-mean modes), ``num_tokens`` (token-mean) and the
    same ``max_len`` (norm mode). With local defaults only seq-mean modes with equal-sized
    parts averaged over parts agree; token-mean does not.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(
            f"unknown aggregation mode {mode!r}; known: {', '.join(AGGREGATION_MODES)}"
        )
    m = mask.bool()
    x = _masked(token_values, m)
    if mode == "token-mean":
        return x.sum() / (m.sum().clamp(min=1) if num_tokens is None else num_tokens)
    n = m.shape[0] if num_sequences is None else num_sequences
    if mode == "seq-mean-token-mean":
        return (x.sum(dim=1) / m.sum(dim=1).clamp(min=1)).sum() / n
    if mode == "seq-mean-token-sum-norm":
        return x.sum() / (n * (m.shape[1] if max_len is None else max_len))
    return x.sum() / n


# The off-policy and sequence-level estimators register themselves in the tables above.
from llm_mdp import estimators_offpolicy as _offpolicy  # noqa: E402, F401
