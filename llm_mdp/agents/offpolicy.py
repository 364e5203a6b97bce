"""Off-policy training: sampling from a behavior policy, corrections, DAPO's batch filters.

Every agent gets these settings through :class:`OffPolicyFields` (a base of
:class:`~llm_mdp.agents.base.AgentConfig`). Rollouts may sample from a behavior policy
``mu`` that differs from the trained ``pi``: another temperature, top-k or top-p
truncation (through the policy's sampler, :func:`~llm_mdp.policies.sampling.truncate_log_probs`).
Then the rollout's log-probs are ``mu``'s; :func:`prepare_behavior` keeps them as
``behavior_logp`` and recomputes ``pi``'s (the ``old`` log-probs of the ratio,
TRL's ``old_per_token_logps``), and the loss is multiplied by the correction chosen with
``behavior_correction`` (:data:`llm_mdp.estimators_offpolicy.BEHAVIOR_CORRECTIONS`). What
each correction is unbiased for is in ``docs/estimators.md``: only ``seq_tis`` with an
infinite cap makes the update unbiased for ``grad J(pi)``, and no correction recovers the
tokens that top-k / top-p never sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from llm_mdp import estimators_offpolicy as offp
from llm_mdp.agents.rollout import Rollout
from llm_mdp.estimators import PolicyLossOutput

if TYPE_CHECKING:
    from llm_mdp.agents.base import Agent

__all__ = [
    "OffPolicyFields",
    "behavior_sampling",
    "concat_rollouts",
    "correct_loss",
    "dynamic_sampling",
    "prepare_behavior",
]


@dataclass
class OffPolicyFields:
    """Off-policy settings shared by every agent config.

    Every rollout of an update (TRePO's value rollouts and ReMax's greedy one included)
    runs under the behavior sampler; the update differentiates ``pi``.

    Attributes:
        sampling_temperature: temperature of the behavior sampler (``None``: the trained
            policy's ``temperature``, i.e. on-policy).
        top_k: sample from the ``top_k`` most likely tokens only (0: off).
        top_p: nucleus sampling mass (1: off).
        behavior_correction: ``none``, ``tis``, ``mis``, ``seq_tis`` or ``seq_mis``.
        behavior_cap: the correction's cap ``C`` (``inf``: none).
        behavior_cap_low: lower bound of the correction (``None``: none).
        loss_options: extra keyword options of the policy loss (e.g. CISPO's
            ``{"clip_high": 4.0}``); override those built from ``clip_low`` / ``clip_high``.
        dynamic_sampling: DAPO: drop groups whose rewards are all equal and refill the
            batch with fresh groups (``group_size >= 2``).
        dynamic_sampling_max_batches: most rollout batches per update when refilling; if
            still short, dropped groups fill the rest (their centred advantage is 0).
        overlong_cache: DAPO's soft overlong penalty (``estimators_offpolicy.overlong_penalty``)
            over the last ``overlong_cache`` tokens before the env's length cap (0: off).
    """

    sampling_temperature: float | None = None
    top_k: int = 0
    top_p: float = 1.0
    behavior_correction: str = "none"
    behavior_cap: float = 2.0
    behavior_cap_low: float | None = None
    loss_options: dict[str, Any] = field(default_factory=dict)
    dynamic_sampling: bool = False
    dynamic_sampling_max_batches: int = 4
    overlong_cache: int = 0

    def check_off_policy(self) -> None:
        offp.get_behavior_correction(self.behavior_correction)
        if self.sampling_temperature is not None and not self.sampling_temperature > 0:
            raise ValueError(f"sampling_temperature={self.sampling_temperature}, expected > 0")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1; got {self.top_k}, {self.top_p}")
        if self.dynamic_sampling_max_batches < 1 or self.overlong_cache < 0:
            raise ValueError(
                "need dynamic_sampling_max_batches >= 1 and overlong_cache >= 0; got "
                f"{self.dynamic_sampling_max_batches}, {self.overlong_cache}"
            )

    @property
    def samples_off_policy(self) -> bool:
        """The rollout distribution differs from the trained policy's."""
        temp = getattr(self, "temperature", 1.0)
        t = temp if self.sampling_temperature is None else self.sampling_temperature
        return t != temp or self.top_k > 0 or self.top_p < 1.0


@contextlib.contextmanager
def behavior_sampling(policy: Any, cfg: OffPolicyFields) -> Iterator[None]:
    """Sample with ``cfg``'s behavior settings inside the block; restore ``pi``'s after."""
    if not cfg.samples_off_policy:
        yield
        return
    for name in ("top_k", "top_p"):
        if not hasattr(policy, name):
            raise TypeError(f"{type(policy).__name__} has no {name!r} sampling attribute")
    saved = (policy.temperature, policy.top_k, policy.top_p)
    if cfg.sampling_temperature is not None:
        policy.temperature = cfg.sampling_temperature
    policy.top_k, policy.top_p = cfg.top_k, cfg.top_p
    try:
        yield
    finally:
        policy.temperature, policy.top_k, policy.top_p = saved


@torch.no_grad()
def prepare_behavior(agent: Agent, batch: Rollout) -> None:
    """Keep the sampler's log-probs as ``behavior_logp``; ``sample_logp`` becomes ``pi``'s."""
    if batch.behavior_logp is None:
        batch.behavior_logp = batch.sample_logp
    logp = agent.policy.log_probs(batch.input_ids, batch.attention_mask, batch.prompt_width)
    batch.sample_logp = logp.float() * batch.response_mask


def correct_loss(cfg: OffPolicyFields, out: PolicyLossOutput, mb: Rollout) -> PolicyLossOutput:
    """Multiply the per-token loss by the behavior correction of ``pi_old`` against ``mu``."""
    if cfg.behavior_correction == "none" or mb.behavior_logp is None:
        return out
    w = offp.behavior_weights(
        cfg.behavior_correction,
        mb.sample_logp,
        mb.behavior_logp,
        mb.response_mask,
        cap=cfg.behavior_cap,
        cap_low=cfg.behavior_cap_low,
    )
    return offp.apply_behavior_correction(out, w.to(out.loss.dtype), mb.response_mask)


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """Stack rollouts of one env (same prompt width) row-wise, right-padding responses."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.input_ids.shape[1] for p in parts)
    length = width - parts[0].prompt_width

    def pad(x: torch.Tensor, to: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, to - x.shape[1]))

    def cat(xs: list[Any], own: list[int]) -> Any:
        """Per-row values of the parts, stacked; response columns right-padded."""
        if any(x is None for x in xs) or not isinstance(xs[0], torch.Tensor):
            return None
        if xs[0].dim() == 1:
            return torch.cat(xs)
        # a part's column count is its own response length (+ 1 for prefix values)
        return torch.cat([pad(x, x.shape[1] - n + length) for x, n in zip(xs, own, strict=True)])

    own = [p.input_ids.shape[1] - p.prompt_width for p in parts]
    fields = {k: cat([getattr(p, k) for p in parts], own) for k in Rollout.ROW_FIELDS}
    extras = {}
    for k, v in parts[0].extras.items():
        if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[0] == len(parts[0]):
            extras[k] = torch.cat([pad(p.extras[k], length) for p in parts])
    return dataclasses.replace(
        parts[0],
        input_ids=torch.cat([pad(p.input_ids, width) for p in parts]),
        attention_mask=torch.cat([pad(p.attention_mask, width) for p in parts]),
        extras=extras,
        policy_state=None,
        **fields,
    )


def overlong(cfg: OffPolicyFields, batch: Rollout, max_len: int) -> None:
    """Add DAPO's soft overlong penalty to ``batch.rewards`` in place (``overlong_cache > 0``)."""
    if cfg.overlong_cache:
        pen = offp.overlong_penalty(batch.response_lengths, max_len, cfg.overlong_cache)
        batch.rewards = batch.rewards + pen.to(batch.rewards.dtype)


def dynamic_sampling(agent: Agent, batch: Rollout) -> tuple[Rollout, dict[str, float]]:
    """DAPO's dynamic sampling: keep groups whose rewards differ, refill from fresh batches."""
    cfg, g = agent.config, batch.group_size
    n_groups = len(batch) // g

    def split(b: Rollout) -> tuple[Rollout, Rollout]:
        keep = offp.dynamic_sampling_keep(b.rewards, g).repeat_interleave(g)
        rows = torch.arange(len(b), device=keep.device)
        return b.select(rows[keep]), b.select(rows[~keep])

    kept, dropped = split(batch)
    kept_parts, dropped_parts = [kept], [dropped]
    n_kept, batches = len(kept) // g, 1
    while n_kept < n_groups and batches < cfg.dynamic_sampling_max_batches:
        agent.refill += 1  # fresh random streams for the refill
        more = agent.collect()
        overlong(cfg, more, agent.env.R)
        k, d = split(more)
        kept_parts.append(k)
        dropped_parts.append(d)
        n_kept += len(k) // g
        batches += 1
    full = concat_rollouts([p for p in kept_parts + dropped_parts if len(p)])
    rows = torch.arange(n_groups * g, device=full.rewards.device)
    stats = {"dynamic_sampling/kept_frac": min(n_kept, n_groups) / n_groups}
    stats["dynamic_sampling/batches"] = float(batches)
    stats["dynamic_sampling/keep_rate"] = n_kept / (batches * n_groups) if batches else math.nan
    agent.refill = 0
    return full.select(rows), stats
