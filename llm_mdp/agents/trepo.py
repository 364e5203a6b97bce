"""TRePO, Token-Reinforced Policy Optimization (``docs/theory.md#trepo``).

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

Multi-turn tasks: positions count the policy's tokens only. The states are decision
states (:meth:`~llm_mdp.agents.rollout.Rollout.decision_columns`): ``s_{t+1}`` of a
turn's EOS is the state after the environment's reply, so anchors and value-rollout
restarts are prefixes that end inside or between turns, never inside a reply, and
``A_t`` lands on the response column of the policy's ``t``-th token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import numpy as np
import torch

from llm_mdp import estimators as est
from llm_mdp.agents.base import STREAM_VALUE, Agent, AgentConfig
from llm_mdp.agents.rollout import EnvPool, Rollout, rollout_prefixes
from llm_mdp.anchors import anchor_plan, place_estimates
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
            keep one step's logits within 16 MiB of float32, at least ``num_envs``, so at
            a 50k vocabulary a value batch is about the main rollout's size and TRePO's
            peak memory GRPO's; a small vocabulary runs all of an update's value rollouts
            in one batch). Changes speed and memory, not the estimates: every value
            rollout draws from its own random stream.
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
    keep_state = True  # value rollouts start from the main rollout's KV cache

    def setup(self) -> None:
        self.value_envs = EnvPool(self.env)  # value rollouts run in envs of their own size

    @property
    def default_value_batch_size(self) -> int:
        """Rows per value-rollout batch when ``value_batch_size`` is None (see there)."""
        return max(self.env.num_envs, (1 << 22) // self.env.vocab_size)

    def episodes_run(self) -> int:
        return super().episodes_run() + self.value_envs.episodes_finished

    def tokens_generated_run(self) -> int:
        return super().tokens_generated_run() + self.value_envs.tokens_generated

    def collect(self) -> Rollout:
        batch = super().collect()
        cfg = self.config
        B, L = len(batch), batch.response_mask.shape[1]
        n_policy = batch.response_mask.sum(-1)  # positions 1..T are the policy's tokens
        lengths = n_policy.tolist()
        columns = batch.decision_columns()[0].tolist()  # prefix length of each state
        responses = batch.response_ids.tolist()
        prompts = batch.prompt_indices.tolist()
        rows = self.global_rows.tolist()

        # which prefix values to estimate: one plan, shared with the exact check
        dev = batch.rewards.device
        anchors = torch.zeros((B, L), dtype=torch.bool)
        for i, T in enumerate(lengths):
            if cfg.num_anchors is None or cfg.num_anchors >= T:
                anchors[i, :T] = True
            else:
                # a row's anchors depend on (seed, update, global row) only: the same
                # whatever the batching or the world size
                row_rng = np.random.default_rng([cfg.seed, self.update, rows[i]])
                anchors[i, row_rng.choice(T, cfg.num_anchors, replace=False)] = True
        plan = anchor_plan(n_policy.cpu(), anchors, value_estimates=cfg.value_estimates)
        jobs = plan.jobs()  # (row, column, slot); V_hat(s_1) comes from the group below
        K = cfg.rollouts_per_prefix
        # one random stream per (global row, column, k, slot): independent of how the
        # value rollouts are batched, so the estimates do not depend on it
        keys = [
            (rows[i] << 32) | (c << 16) | (k << 1) | slot for i, c, slot in jobs for k in range(K)
        ]
        streams = self.streams(
            STREAM_VALUE, torch.tensor(keys, dtype=torch.long, device=self.env.device)
        )
        rewards = rollout_prefixes(
            self.value_envs,
            self.policy,
            [prompts[i] for i, _, _ in jobs],
            [responses[i][: columns[i][c]] for i, c, _ in jobs],
            copies=K,
            streams=streams,
            batch_size=cfg.value_batch_size or self.default_value_batch_size,
            source=(batch.policy_state, [i for i, _, _ in jobs]),
        )
        batch.policy_state = None  # the cache is not needed past here
        means = rewards.mean(1).cpu() if jobs else torch.zeros(0)

        slots = torch.zeros((2, B, L + 1), dtype=batch.rewards.dtype)
        if jobs:
            where = torch.tensor(jobs, dtype=torch.long)
            slots[where[:, 2], where[:, 0], where[:, 1]] = means.to(slots.dtype)
        # V_hat(s_1): leave-one-out mean of the other responses to the same prompt
        G = batch.group_size
        r = batch.rewards.view(-1, G).cpu()
        slots[0, :, 0] = ((r.sum(1, keepdim=True) - r) / (G - 1)).reshape(-1)
        values, next_values = place_estimates(plan, slots[0], slots[1])
        values, known = values.to(dev), plan.known.to(dev)
        next_values = next_values.to(dev) if next_values is not None else None
        batch.prefix_values, batch.prefix_known, batch.next_values = values, known, next_values
        batch.value_rollouts = len(jobs) * K
        return batch

    def advantages(self, batch: Rollout) -> torch.Tensor:
        inputs = self.advantage_inputs(
            batch,
            prefix_values=batch.prefix_values,
            prefix_known=batch.prefix_known,
            next_values=batch.next_values,
        )
        interpolation = self.config.interpolation
        if not batch.multi_turn:
            return est.compute_advantages("trepo", inputs, interpolation=interpolation)
        # the estimator runs over decision states (right-padded: the policy's t-th token
        # at column t - 1); its weights then go back to those tokens' response columns
        mask = batch.response_mask
        L = mask.shape[1]
        columns = batch.decision_columns()[0][:, :L]
        states = torch.arange(L, device=mask.device)[None, :] < mask.sum(-1, keepdim=True)
        adv = est.compute_advantages(
            "trepo", replace(inputs, mask=states.long()), interpolation=interpolation
        )
        out = torch.zeros((len(batch), L + 1), dtype=adv.dtype, device=adv.device)
        out.scatter_(1, torch.where(states, columns, L), torch.where(states, adv, 0))
        return out[:, :L]
