"""GRPO (DeepSeekMath, arXiv 2402.03300): group-normalized rewards, clipped surrogate.

``G`` responses per prompt; advantage ``(R_i - mean_group) / (std_group + eps)`` on every
token, PPO-clip surrogate, per-sequence token mean, and ``beta * k3`` KL in the *loss*.
``docs/theory.md#estimators``: the mean includes the sample itself, so the mean-only variant is
``(G-1)/G`` times the unbiased gradient; the std division re-weights groups (a
per-group learning rate). Dr. GRPO (arXiv 2503.20783) is ``std_scaling="none"`` with
``aggregation="seq-mean-token-sum-norm"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from llm_mdp import estimators as est
from llm_mdp.agents.base import Agent, AgentConfig
from llm_mdp.agents.rollout import Rollout
from llm_mdp.validation import Range


@dataclass
class GRPOConfig(AgentConfig):
    """GRPO defaults from DeepSeekMath: clip 0.2, beta 0.04 with k3 in the loss.

    Attributes:
        std_scaling: ``"group"`` (GRPO), ``"batch"`` or ``"none"`` (Dr. GRPO).
        std_eps: added to the std before dividing.
        importance_sampling_level: ``"token"`` (GRPO's per-token ratio) or ``"sequence"``:
            GSPO (arXiv 2507.18071), the clipped surrogate on the length-normalised
            sequence ratio (loss ``"gspo"`` with ``clip_low`` / ``clip_high``), as TRL
            names it. Set the clip range GSPO needs (the paper: ``3e-4`` / ``4e-4``).
    """

    group_size: int = 8
    loss: str = "ppo_clip"
    aggregation: str = "seq-mean-token-mean"
    kl_coef: float = 0.04
    kl_estimator: str = "k3"
    kl_placement: Literal["reward", "loss"] = "loss"
    std_scaling: Literal["group", "batch", "none"] = "group"
    std_eps: float = 1e-6
    importance_sampling_level: Literal["token", "sequence"] = "token"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                f"importance_sampling_level={self.importance_sampling_level!r}, "
                "expected 'token' or 'sequence'"
            )
        if self.importance_sampling_level == "sequence" and self.loss != "ppo_clip":
            raise ValueError(
                f"importance_sampling_level='sequence' is GSPO's clipped surrogate; it "
                f"replaces loss='ppo_clip', got loss={self.loss!r}"
            )

    field_ranges: ClassVar[dict[str, Range]] = AgentConfig.field_ranges | {"std_eps": Range(0)}


class GRPO(Agent):
    name = "grpo"
    config_class = GRPOConfig
    config: GRPOConfig

    @property
    def policy_loss_name(self) -> str:
        return "gspo" if self.config.importance_sampling_level == "sequence" else self.config.loss

    def advantages(self, batch: Rollout) -> torch.Tensor:
        cfg = self.config
        return est.compute_advantages(
            "grpo", self.advantage_inputs(batch), std_scaling=cfg.std_scaling, eps=cfg.std_eps
        )
