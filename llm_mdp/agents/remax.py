"""ReMax (Li et al., arXiv 2310.10505): REINFORCE with the greedy response as baseline.

For each prompt, one sampled response ``W`` and one greedy response ``W_greedy`` (the
policy in greedy mode through the same env); the weight is ``RM(W) - RM(W_greedy)``.
The greedy reward depends on the prompt only, so the estimate stays unbiased. On a
multi-turn task with random replies the greedy rollout draws the environment's replies
from streams of its own, independent of the sample's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_mdp import estimators as est
from llm_mdp.agents.base import STREAM_MAIN, Agent, AgentConfig
from llm_mdp.agents.rollout import Rollout, rollout

STREAM_GREEDY = 2  # stream kind of the greedy rollout (only its env replies draw from it)


@dataclass
class ReMaxConfig(AgentConfig):
    """ReMax: one sample and one greedy rollout per prompt, vanilla policy gradient."""


class ReMax(Agent):
    name = "remax"
    config_class = ReMaxConfig

    def collect(self) -> Rollout:
        G = self.config.group_size
        options = {"prompt_indices": self.sample_prompts(self.env.num_envs // G), "group_size": G}
        batch = rollout(self.env, self.policy, options, streams=self.streams(STREAM_MAIN))
        greedy = rollout(
            self.env, self.policy, options, greedy=True, streams=self.streams(STREAM_GREEDY)
        )
        batch.baseline = greedy.rewards
        return batch

    def advantages(self, batch: Rollout) -> torch.Tensor:
        inputs = self.advantage_inputs(batch, baseline=batch.baseline)
        return est.compute_advantages("remax", inputs)
