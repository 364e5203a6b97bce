"""REINFORCE++ (Hu et al., arXiv 2501.03262): REINFORCE with PPO's tricks and no critic.

Token rewards ``-beta KL_t`` on every token plus ``RM(W)`` on the last one, return-to-go,
then one normalisation over the whole batch; PPO's clipped surrogate.
``baseline="group"`` is REINFORCE++-baseline: ``G`` responses per prompt,
the group mean reward subtracted first, then the batch std. Both are biased for
``grad J`` by their data-dependent scale (``docs/estimators.md``); their fixed point is
still the reward's optimum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from llm_mdp import estimators as est
from llm_mdp.agents.base import Agent, AgentConfig
from llm_mdp.agents.rollout import Rollout


@dataclass
class REINFORCEPPConfig(AgentConfig):
    """REINFORCE++ defaults: PPO clip 0.2, k1 KL in the token rewards, token-mean loss.

    Attributes:
        baseline: ``"none"`` (REINFORCE++, estimator ``reinforce_pp``) or ``"group"``
            (REINFORCE++-baseline, ``reinforce_pp_baseline``, ``group_size >= 2``).
        norm_eps: added to the batch std before dividing.
    """

    loss: str = "ppo_clip"
    aggregation: str = "token-mean"
    kl_coef: float = 0.01
    kl_estimator: str = "k1"
    kl_placement: Literal["reward", "loss"] = "reward"
    baseline: Literal["none", "group"] = "none"
    norm_eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.baseline not in ("none", "group"):
            raise ValueError(f"baseline={self.baseline!r}, expected 'none' or 'group'")
        if self.baseline == "group" and self.group_size < 2:
            raise ValueError("baseline='group' (REINFORCE++-baseline) needs group_size >= 2")


class REINFORCEPP(Agent):
    name = "reinforce_pp"
    config_class = REINFORCEPPConfig
    config: REINFORCEPPConfig

    @property
    def kl_in_advantages(self) -> bool:
        return False  # the KL is a token reward, normalised with RM (below)

    def advantages(self, batch: Rollout) -> torch.Tensor:
        cfg = self.config
        mask = batch.response_mask
        token_rewards = est.zra_token_rewards(batch.rewards, mask)
        if self.ref_policy is not None and cfg.kl_placement == "reward":
            kl = est.compute_kl(
                cfg.kl_estimator, batch.sample_logp, batch.require("ref_logp"), mask
            )
            token_rewards = est.kl_in_reward(token_rewards, kl, cfg.kl_coef, mask)
        name = "reinforce_pp" if cfg.baseline == "none" else "reinforce_pp_baseline"
        inputs = self.advantage_inputs(batch, token_rewards=token_rewards)
        return est.compute_advantages(name, inputs, eps=cfg.norm_eps)
