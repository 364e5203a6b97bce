"""ReMax (Li et al., arXiv 2310.10505): REINFORCE with the greedy response as baseline.

For each prompt, one sampled response ``W`` and one greedy response ``W_greedy`` (the
policy in greedy mode through the same env); the weight is ``RM(W) - RM(W_greedy)``.
The greedy reward depends on the prompt only, so the estimate stays unbiased.

Multi-turn tasks with random replies: the greedy response meets the same environment
as the sample (common random numbers: the same reply streams, so at the same column the
same reply). The baseline then depends on the environment's randomness, never on the
sample's actions, and the estimate stays unbiased: given the state ``s_t``, an action
is drawn independently of the reply draws, so ``E[b * grad log pi(w_t | s_t)] = 0``.
It varies less than with independent replies, as it answers the same hints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_mdp import estimators as est
from llm_mdp.agents.base import STREAM_MAIN, Agent, AgentConfig
from llm_mdp.agents.rollout import Rollout, rollout


@dataclass
class ReMaxConfig(AgentConfig):
    """ReMax: one sample and one greedy rollout per prompt, vanilla policy gradient."""


class ReMax(Agent):
    name = "remax"
    config_class = ReMaxConfig

    def collect(self) -> Rollout:
        G = self.config.group_size
        options = {"prompt_indices": self.sample_prompts(self.env.num_envs // G), "group_size": G}
        streams = self.streams(STREAM_MAIN)
        batch = rollout(self.env, self.policy, options, streams=streams)
        # greedy ignores the token draws; the streams give it the sample's env replies
        greedy = rollout(self.env, self.policy, options, greedy=True, streams=streams)
        batch.baseline = greedy.rewards
        return batch

    def advantages(self, batch: Rollout) -> torch.Tensor:
        inputs = self.advantage_inputs(batch, baseline=batch.baseline)
        return est.compute_advantages("remax", inputs)
