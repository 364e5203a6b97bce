"""RLOO (Ahmadian et al., arXiv 2402.14740): REINFORCE with a leave-one-out baseline.

``G`` responses per prompt; response ``i`` is weighted by ``R_i - mean_{j != i} R_j``.
The baseline excludes the sample itself, so the estimate of ``grad J`` stays unbiased
(``docs/theory.md#estimators``), unlike GRPO's group mean. KL to the reference goes into the
reward, as in the RLOO paper's RLHF set-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from llm_mdp import estimators as est
from llm_mdp.agents.base import Agent, AgentConfig
from llm_mdp.agents.rollout import Rollout


@dataclass
class RLOOConfig(AgentConfig):
    """RLOO defaults: ``k = 4`` samples per prompt, vanilla PG, KL (k1) in the reward."""

    group_size: int = 4
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_placement: Literal["reward", "loss"] = "reward"


class RLOO(Agent):
    name = "rloo"
    config_class = RLOOConfig

    def advantages(self, batch: Rollout) -> torch.Tensor:
        return est.compute_advantages("rloo", self.advantage_inputs(batch))
