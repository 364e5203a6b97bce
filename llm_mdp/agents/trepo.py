"""TRePO, Token-Reinforced Policy Optimization (paper-notes section 4).

Theorem 2 (28) of the paper: the per-token weight ``V(s_{t+1}) - V(s_t)`` -- the value
after token ``t`` minus the value before it -- is the advantage written with
response-level rewards only, the lowest-variance member of the unbiased family. TRePO
estimates both values by Monte Carlo: ``K`` fresh completions from the prefix, through
``env.reset(options={"response_prefix": ...})`` -- no critic network, so it needs only
GRPO's memory (policy, reference, reward).

Reconstructed choices (the paper states the idea, not these details), each an option:

1. ``num_anchors = m`` positions per response are drawn uniformly from ``1..T``
   (``None``: every position, the unbiased all-positions estimator).
2. At an anchor ``t``, ``V_hat(s_t)`` and ``V_hat(s_{t+1})`` are means of ``RM`` over
   ``K = rollouts_per_prefix`` completions; ``V_hat(s_{T+1}) = RM(W)`` (terminal) and
   ``V_hat(s_1)`` is the leave-one-out mean of the prompt's other responses (so it does
   not depend on the sample itself). Adjacent anchors share estimates, or use fresh
   independent ones (``value_estimates="fresh"``).
3. Values between known positions are interpolated (``"linear"`` or ``"constant"``), and
   ``A_t = V_hat(s_{t+1}) - V_hat(s_t)`` (the registered ``trepo`` estimator).
4. PPO-style clipped surrogate on ``A_t``, sum over tokens (unbiased aggregation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from llm_mdp import estimators as est
from llm_mdp.agents.base import STREAM_VALUE, Agent, AgentConfig
from llm_mdp.agents.rollout import EnvPool, Rollout, rollout_prefixes
from llm_mdp.validation import Range


@dataclass
class TRePOConfig(AgentConfig):
    """TRePO settings.

    Attributes:
        num_anchors: ``m`` Monte Carlo anchor positions per response (``None``: all).
        rollouts_per_prefix: ``K`` completions per value estimate.
        interpolation: ``"linear"`` or ``"constant"`` between known values.
        value_estimates: ``"shared"`` (adjacent anchors reuse a value) or ``"fresh"``
            (the two terms of each ``A_t`` come from independent rollouts).
        value_batch_size: most env rows per batch of value rollouts (default: as many as
            keep one step's logits within 64 MiB of float32, at least ``num_envs *
            rollouts_per_prefix``; a small vocabulary runs all of an update's value
            rollouts in one batch). Changes speed and memory, not the estimates: every
            value rollout draws from its own random stream.
    """

    group_size: int = 4
    loss: str = "ppo_clip"
    aggregation: str = "seq-mean-token-sum"
    num_anchors: int | None = 2
    rollouts_per_prefix: int = 4
    interpolation: Literal["linear", "constant"] = "linear"
    value_estimates: Literal["shared", "fresh"] = "shared"
    value_batch_size: int | None = None

    field_ranges: ClassVar[dict[str, Range]] = AgentConfig.field_ranges | {
        "num_anchors": Range(1),
        "rollouts_per_prefix": Range(1),
        "value_batch_size": Range(1),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 2:
            raise ValueError(
                f"group_size={self.group_size}: expected an integer >= 2 (TRePO estimates "
                "V(s_1) from the prompt's other responses)"
            )


class TRePO(Agent):
    name = "trepo"
    config_class = TRePOConfig
    config: TRePOConfig

    def setup(self) -> None:
        self.value_envs = EnvPool(self.env)  # value rollouts run in envs of their own size

    @property
    def default_value_batch_size(self) -> int:
        """Rows per value-rollout batch when ``value_batch_size`` is None (see there)."""
        floor = self.env.num_envs * self.config.rollouts_per_prefix
        return max(floor, (1 << 24) // self.env.vocab_size)

    def episodes_run(self) -> int:
        return super().episodes_run() + self.value_envs.episodes_finished

    def collect(self) -> Rollout:
        batch = super().collect()
        cfg = self.config
        B, L = len(batch), batch.response_mask.shape[1]
        lengths = batch.response_lengths.tolist()
        responses = batch.response_ids.tolist()
        prompts = batch.prompt_indices.tolist()
        rows = self.global_rows.tolist()

        # which prefix values to estimate: column c is V_hat(s_{c+1}), c response tokens
        before: set[tuple[int, int]] = set()
        after: set[tuple[int, int]] = set()
        for i, T in enumerate(lengths):
            positions: list[int] = list(range(1, T + 1))
            if cfg.num_anchors is not None and cfg.num_anchors < T:
                # a row's anchors depend on (seed, update, global row) only: the same
                # whatever the batching or the world size
                row_rng = np.random.default_rng([cfg.seed, self.update, rows[i]])
                positions = sorted((row_rng.choice(T, cfg.num_anchors, replace=False) + 1).tolist())
            for t in positions:
                if t - 1 > 0:
                    before.add((i, t - 1))
                if t < T:
                    after.add((i, t))
        fresh = cfg.value_estimates == "fresh"
        jobs = sorted(before | (set() if fresh else after)) + (sorted(after) if fresh else [])
        n_before = len(jobs) - (len(after) if fresh else 0)
        K = cfg.rollouts_per_prefix
        # one random stream per (global row, column, k, before/after): independent of how
        # the value rollouts are batched, so the estimates do not depend on it
        keys = [
            (rows[i] << 32) | (c << 16) | (k << 1) | int(j >= n_before)
            for j, (i, c) in enumerate(jobs)
            for k in range(K)
        ]
        streams = self.streams(
            STREAM_VALUE, torch.tensor(keys, dtype=torch.long, device=self.env.device)
        )
        rewards = rollout_prefixes(
            self.value_envs,
            self.policy,
            [prompts[i] for i, _ in jobs],
            [responses[i][:c] for i, c in jobs],
            copies=K,
            streams=streams,
            batch_size=cfg.value_batch_size or self.default_value_batch_size,
        )
        means = rewards.mean(1).tolist()

        dev = batch.rewards.device
        values = torch.zeros((B, L + 1), device=dev)
        known = torch.zeros((B, L + 1), dtype=torch.bool, device=dev)
        next_values = torch.full((B, L), float("nan"), device=dev) if fresh else None
        for j, ((i, c), v) in enumerate(zip(jobs, means, strict=True)):
            if j < n_before:
                values[i, c], known[i, c] = v, True
            else:
                assert next_values is not None
                next_values[i, c - 1] = v
                if (i, c) not in before:  # an "after" estimate is also V_hat at column c
                    values[i, c], known[i, c] = v, True
        if next_values is not None:  # no fresh estimate of V_hat(s_{t+1}): use the shared one
            next_values = torch.where(next_values.isnan(), values[:, 1:], next_values)
        # V_hat(s_1): leave-one-out mean of the other responses to the same prompt
        G = batch.group_size
        r = batch.rewards.view(-1, G)
        values[:, 0] = ((r.sum(1, keepdim=True) - r) / (G - 1)).reshape(-1)
        known[:, 0] = True
        batch.extras.update(prefix_values=values, prefix_known=known, next_values=next_values)
        batch.extras["value_rollouts"] = len(jobs) * K
        return batch

    def advantages(self, batch: Rollout) -> torch.Tensor:
        inputs = self.advantage_inputs(
            batch,
            prefix_values=batch.extras["prefix_values"],
            prefix_known=batch.extras["prefix_known"],
            next_values=batch.extras["next_values"],
        )
        return est.compute_advantages("trepo", inputs, interpolation=self.config.interpolation)
