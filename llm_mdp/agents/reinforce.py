"""REINFORCE (Williams 1992) on the token MDP: weight ``RM(W)`` on every token.

Theorem 1 (21) of the paper: under the Zero-Reward Assumption the response-level reward
of a sampled response, placed on every token, is an unbiased estimate of ``grad J``::

    grad J ~= 1/N sum_i (RM(W_i) - b) sum_t grad log pi(w_t | s_t)

A baseline ``b`` that does not depend on the sample keeps it unbiased (Lemma 2); the
option here is an exponential moving average of past batches' mean reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from llm_mdp import estimators as est
from llm_mdp.agents.base import Agent, AgentConfig
from llm_mdp.agents.rollout import Rollout
from llm_mdp.validation import Range


@dataclass
class REINFORCEConfig(AgentConfig):
    """REINFORCE: one sample per prompt, vanilla policy gradient, sum over tokens.

    Attributes:
        baseline: ``"none"`` or ``"ema"`` (moving average of earlier batches' mean reward;
            it never includes the current batch, so the estimate stays unbiased).
        baseline_decay: EMA decay of the ``"ema"`` baseline.
    """

    baseline: Literal["none", "ema"] = "none"
    baseline_decay: float = 0.9

    field_ranges: ClassVar[dict[str, Range]] = AgentConfig.field_ranges | {
        "baseline_decay": Range(0, 1)
    }


class REINFORCE(Agent):
    name = "reinforce"
    config_class = REINFORCEConfig
    config: REINFORCEConfig

    def setup(self) -> None:
        self._ema: float | None = None

    def advantages(self, batch: Rollout) -> torch.Tensor:
        b = None
        if self.config.baseline == "ema" and self._ema is not None:
            b = torch.full_like(batch.rewards, self._ema)
        adv = est.compute_advantages("reinforce", self.advantage_inputs(batch, baseline=b))
        mean = float(batch.rewards.mean())  # update the baseline after using it
        d = self.config.baseline_decay
        self._ema = mean if self._ema is None else d * self._ema + (1 - d) * mean
        return adv

    def extra_state(self) -> dict[str, Any]:
        return {"ema": self._ema}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._ema = state.get("ema")
