"""PPO (Schulman et al., arXiv 1707.06347) for language models, as in InstructGPT.

A critic ``V_phi(s_t)`` gives per-position baselines; GAE (arXiv 1506.02438) over the
token rewards -- ``RM(W)`` on the last token (Zero-Reward Assumption) minus ``beta * k1``
per token -- gives the advantages; the policy takes ``epochs`` x ``minibatches``
clipped-surrogate steps and the critic a clipped value-regression step.

``docs/theory.md#estimators``: with ZRA, ``gamma = 1`` and ``lambda = 1`` the advantage is
``RM(W) - V_phi(s_t)``: unbiased for an exact critic (Lemma 2), a per-position baseline.

Critic: a *separate* network, a copy of the policy's transformer trunk (no LM head) plus
a linear value head, initialized from the policy -- the usual RLHF set-up. It costs a
second model's weights, gradients and Adam state: that is PPO's memory over GRPO and
TRePO, measured in ``benchmarks/``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from llm_mdp import estimators as est
from llm_mdp.agents.base import Agent, AgentConfig
from llm_mdp.agents.rollout import Rollout
from llm_mdp.validation import Range


class ValueModel(nn.Module):
    """``V(s_t)`` for every response position from a transformer trunk and a linear head."""

    def __init__(self, trunk: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy: nn.Module) -> ValueModel:
        model = getattr(policy, "model", None)
        base = getattr(model, "base_model", None)
        if model is None or base is None or model is base:
            raise TypeError(
                "PPO's critic copies the trunk of a transformers causal LM "
                f"(policy.model.base_model); got {type(policy).__name__}"
            )
        return cls(copy.deepcopy(base), int(model.config.hidden_size))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
    ) -> torch.Tensor:
        """``(B, W - P)``: column ``j`` is ``V(s_{j+1})``, read at the token before it."""
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=pos
        ).last_hidden_state
        h = hidden[:, prompt_width - 1 : -1]
        return self.head(h).squeeze(-1).float() * attention_mask[:, prompt_width:]


@dataclass
class PPOConfig(AgentConfig):
    """PPO defaults in the InstructGPT/RLHF tradition.

    Attributes:
        gamma: discount of GAE (keep 1 under ZRA: eq. (26)).
        lam: GAE lambda.
        vf_coef: weight of the value loss.
        value_clip: clip range of the value update around the rollout's values.
        whiten_advantages: normalize advantages over the batch (mean 0, std 1).
    """

    loss: str = "ppo_clip"
    epochs: int = 4
    minibatches: int = 1
    aggregation: str = "token-mean"
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    value_clip: float = 0.2
    whiten_advantages: bool = True

    field_ranges: ClassVar[dict[str, Range]] = AgentConfig.field_ranges | {
        "gamma": Range(0, 1, low_open=True),
        "lam": Range(0, 1),
        "vf_coef": Range(0),
        "value_clip": Range(0, low_open=True),
    }


class PPO(Agent):
    name = "ppo"
    config_class = PPOConfig
    config: PPOConfig

    def setup(self) -> None:
        self.critic = ValueModel.from_policy(self._as_module(self.policy)).to(self.device).eval()
        self.modules["critic"] = self.critic

    def advantages(self, batch: Rollout) -> torch.Tensor:
        cfg = self.config
        mask = batch.response_mask
        with torch.no_grad():
            values = self.critic(batch.input_ids, batch.attention_mask, batch.prompt_width)
        rewards = est.zra_token_rewards(batch.rewards, mask)
        if self.ref_policy is not None:  # KL in the reward, per token, as InstructGPT
            kl = est.compute_kl(
                cfg.kl_estimator, batch.sample_logp, batch.require("ref_logp"), mask
            )
            rewards = est.kl_in_reward(rewards, kl, cfg.kl_coef, mask)
        adv, returns = est.compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
        batch.values, batch.returns = values, returns
        if cfg.whiten_advantages:  # mean and std over the global batch (all ranks)
            adv = est.get_advantage_transform("whiten")(adv, mask, all_reduce=self.dist.all_reduce)
        return adv

    @property
    def kl_in_advantages(self) -> bool:
        return False  # PPO puts the KL into the token rewards before GAE (above)

    def extra_loss(
        self, mb: Rollout, counts: dict[str, float]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        mask = mb.response_mask
        v = self.critic(mb.input_ids, mb.attention_mask, mb.prompt_width)
        old, target = mb.require("values"), mb.require("returns")
        v_clipped = old + (v - old).clamp(-cfg.value_clip, cfg.value_clip)
        loss_tok = 0.5 * torch.maximum((v - target) ** 2, (v_clipped - target) ** 2)
        v_loss = est.aggregate(loss_tok, mask, "token-mean", num_tokens=counts["num_tokens"])
        return cfg.vf_coef * v_loss, {"loss/value": float(v_loss.detach())}
