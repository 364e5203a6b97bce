"""PPO (Schulman et al., arXiv 1707.06347) for language models, as in InstructGPT.

A critic ``V_phi(s_t)`` gives per-position baselines; GAE (arXiv 1506.02438) over the
token rewards -- ``RM(W)`` on the last token (Zero-Reward Assumption) minus ``beta * k1``
per token -- gives the advantages; the policy takes ``epochs`` x ``minibatches``
clipped-surrogate steps and the critic a clipped value-regression step.

``docs/theory.md#estimators``: with ZRA, ``gamma = 1`` and ``lambda = 1`` the advantage is
``RM(W) - V_phi(s_t)``: unbiased for an exact critic (Lemma 2), a per-position baseline.

Critic (``PPOConfig.critic``), the three set-ups people use:

- ``"copy"`` (default, the usual RLHF set-up): a *separate* network, a copy of the
  policy's transformer trunk (no LM head) plus a linear value head, initialized from the
  policy. It costs a second model's weights, gradients and Adam state.
- ``"shared"``: a linear value head on the policy's own trunk. One trunk forward in the
  loss gives both the log-probs and the values
  (:meth:`~llm_mdp.policies.CausalLMPolicy.log_probs_and_hidden`; the rollout's values
  take one no-grad trunk pass without the LM head); ``vf_coef`` is the
  weight with which the value loss's gradient reaches the trunk, so the value regression
  moves the policy too. The reference model (a frozen copy of the policy made before the
  head exists) and the KL are unchanged: the KL still compares the policy's log-probs,
  which depend on the trunk and LM head only, never on the value head.
- ``"small"``: a separate critic with fewer layers: the policy's trunk class built from
  its config with ``critic_layers`` blocks (default half, at least one), initialized from
  the policy's embeddings, first blocks and final norm. A subclass may override
  :meth:`PPO.build_critic` to return any module with :class:`ValueModel`'s ``forward``.

``benchmarks/`` measures each one's memory and reward against GRPO and TRePO (no critic).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from llm_mdp import estimators as est
from llm_mdp.agents.base import Agent, AgentConfig
from llm_mdp.agents.rollout import Rollout
from llm_mdp.policies import hf
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
    def from_policy(cls, policy: nn.Module, num_layers: int | None = None) -> ValueModel:
        """A critic from the policy's trunk: a full copy (``num_layers=None``) or a trunk of
        the same class with its first ``num_layers`` blocks (embeddings and final norm
        copied too)."""
        model = getattr(policy, "model", None)
        base = getattr(model, "base_model", None)
        if model is None or base is None or model is base:
            raise TypeError(
                "PPO's critic is built from the trunk of a transformers causal LM "
                f"(policy.model.base_model); got {type(policy).__name__}"
            )
        hidden = int(model.config.hidden_size)
        if num_layers is None:
            return cls(copy.deepcopy(base), hidden)
        return cls(_truncated_trunk(base, num_layers), hidden)

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


def _truncated_trunk(base: Any, num_layers: int) -> nn.Module:
    """The trunk class of ``base`` with ``num_layers`` blocks, weights copied from ``base``
    (every tensor of the smaller trunk has the same name and shape in ``base``)."""
    config = copy.deepcopy(base.config)
    total = int(config.num_hidden_layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"critic_layers={num_layers}: expected 1 .. {total} (the policy's layers)")
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds
        config.layer_types = config.layer_types[:num_layers]
    small = type(base)(config)
    mine = small.state_dict()
    theirs = base.state_dict()
    missing = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape]
    if missing:
        raise ValueError(
            f"{type(base).__name__}: cannot initialize a {num_layers}-layer critic from the "
            f"policy (no match for {missing[:3]})"
        )
    small.load_state_dict({k: theirs[k] for k in mine})
    return small.to(next(base.parameters()).device, next(base.parameters()).dtype)


class SharedValueHead(nn.Module):
    """``V(s_t)`` from hidden states of the policy's own trunk (``critic="shared"``)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, hidden: torch.Tensor, resp_mask: torch.Tensor) -> torch.Tensor:
        """``(B, R, H)`` hidden states predicting each response token -> ``(B, R)`` values
        (0 on padding), float32."""
        return self.head(hidden).squeeze(-1).float() * resp_mask


CRITICS = ("copy", "shared", "small")


@dataclass
class PPOConfig(AgentConfig):
    """PPO defaults in the InstructGPT/RLHF tradition.

    Attributes:
        gamma: discount of GAE (keep 1 under ZRA: eq. (26)).
        lam: GAE lambda.
        vf_coef: weight of the value loss.
        value_clip: clip range of the value update around the rollout's values.
        whiten_advantages: normalize advantages over the batch (mean 0, std 1).
        critic: ``"copy"`` (a separate copy of the policy's trunk + value head),
            ``"shared"`` (a value head on the policy's trunk; the value loss trains the
            trunk with weight ``vf_coef``) or ``"small"`` (a separate trunk with
            ``critic_layers`` blocks). See the module docstring.
        critic_layers: blocks of the ``"small"`` critic (default: half the policy's, at
            least 1); only with ``critic="small"``.
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
    critic: str = "copy"
    critic_layers: int | None = None

    field_ranges: ClassVar[dict[str, Range]] = AgentConfig.field_ranges | {
        "gamma": Range(0, 1, low_open=True),
        "lam": Range(0, 1),
        "vf_coef": Range(0),
        "value_clip": Range(0, low_open=True),
        "critic_layers": Range(1),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.critic not in CRITICS:
            raise ValueError(f"critic={self.critic!r}: expected one of {', '.join(CRITICS)}")
        if self.critic_layers is not None and self.critic != "small":
            raise ValueError(
                f"critic_layers={self.critic_layers} is only used with critic='small', "
                f"got critic={self.critic!r}"
            )
        if self.critic == "shared" and self.parallel == "fsdp":
            raise ValueError("critic='shared' is not supported with parallel='fsdp'")


class PPO(Agent):
    name = "ppo"
    config_class = PPOConfig
    config: PPOConfig

    def setup(self) -> None:
        self._hidden: torch.Tensor | None = None  # shared critic: the loss forward's states
        self.critic = self.build_critic().to(self.device)
        self.modules["critic"] = self.critic

    def build_critic(self) -> nn.Module:
        """The critic module for ``config.critic`` (override for a custom critic: any
        module with :class:`ValueModel`'s ``forward``; it is trained and checkpointed)."""
        cfg = self.config
        policy: Any = self._as_module(self.policy)
        if cfg.critic == "shared":
            if not hasattr(policy, "log_probs_and_hidden"):
                raise TypeError(
                    "critic='shared' needs a policy with log_probs_and_hidden and "
                    f"response_hidden (CausalLMPolicy); got {type(policy).__name__}"
                )
            return SharedValueHead(hf.hidden_size(policy.model)).eval()
        layers = None
        if cfg.critic == "small":
            total = int(policy.model.config.num_hidden_layers)
            layers = cfg.critic_layers if cfg.critic_layers is not None else max(1, total // 2)
        return ValueModel.from_policy(policy, layers).eval()

    def values(self, batch: Rollout) -> torch.Tensor:
        """``(B, R)`` ``V(s_t)`` of the response positions, without gradient."""
        if not isinstance(self.critic, SharedValueHead):
            return self.critic(batch.input_ids, batch.attention_mask, batch.prompt_width)
        hidden = self.policy.response_hidden(  # type: ignore[attr-defined]
            batch.input_ids, batch.attention_mask, batch.prompt_width
        )
        return self.critic(hidden, batch.response_mask.to(hidden.device))

    def policy_log_probs(
        self, mb: Rollout, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shared critic keeps the trunk's hidden states of this forward for
        :meth:`extra_loss` (one trunk forward for log-probs and values)."""
        if not isinstance(self.critic, SharedValueHead):
            return super().policy_log_probs(mb, with_entropy)
        logp, ent, self._hidden = self.policy.log_probs_and_hidden(  # type: ignore[attr-defined]
            mb.input_ids, mb.attention_mask, mb.prompt_width, with_entropy=with_entropy
        )
        return logp, ent

    def advantages(self, batch: Rollout) -> torch.Tensor:
        cfg = self.config
        mask = batch.response_mask
        with torch.no_grad():
            values = self.values(batch)
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
        if isinstance(self.critic, SharedValueHead):
            hidden, self._hidden = self._hidden, None
            if hidden is None:
                raise RuntimeError("critic='shared': extra_loss runs after policy_log_probs")
            v = self.critic(hidden, mask)
        else:
            v = self.critic(mb.input_ids, mb.attention_mask, mb.prompt_width)
        old, target = mb.require("values"), mb.require("returns")
        v_clipped = old + (v - old).clamp(-cfg.value_clip, cfg.value_clip)
        loss_tok = 0.5 * torch.maximum((v - target) ** 2, (v_clipped - target) ** 2)
        v_loss = est.aggregate(loss_tok, mask, "token-mean", num_tokens=counts["num_tokens"])
        return cfg.vf_coef * v_loss, {"loss/value": float(v_loss.detach())}
