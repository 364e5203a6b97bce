"""The settings every agent shares (:class:`AgentConfig`), checked at construction.

Each field has a type and, where it is a number, an allowed range
(:attr:`AgentConfig.field_ranges`); a bad value raises ``TypeError`` or ``ValueError``
naming the field, the value and what was expected, before any model is built.
Subclasses (one per agent) add fields and extend ``field_ranges``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from llm_mdp import estimators as est
from llm_mdp import fsdp
from llm_mdp.agents.offpolicy import OffPolicyFields
from llm_mdp.validation import Range, check_fields


@dataclass
class AgentConfig(OffPolicyFields):
    """Settings shared by every agent. Each agent's subclass overrides the defaults of
    its own paper; every field is documented here, there or in :class:`OffPolicyFields`
    (behavior sampling, corrections, DAPO's filters).

    Attributes:
        seed: seeds prompt sampling, the policy's sampler and torch.
        group_size: responses per prompt ``G`` (contiguous rows); the env's ``num_envs``
            must be a multiple of it. Prompts per update = ``num_envs / G``.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        max_grad_norm: gradient-norm clip (``None``: no clipping).
        epochs: passes over each batch (PPO's ``K`` epochs; GRPO's ``mu``).
        minibatches: optimizer steps per epoch (the batch is split into this many).
        micro_batch_size: rows per forward/backward inside a minibatch (gradient
            accumulation; ``None`` = the whole minibatch). Changes memory, not the result:
            losses are normalized by the minibatch's global counts.
        loss: registered policy loss: ``"vanilla"``, ``"ppo_clip"``, ``"gspo"``, ``"cispo"``.
        clip_low: PPO clip ``epsilon`` (lower side).
        clip_high: upper clip (``None`` = ``clip_low``; larger is DAPO's clip-higher).
        dual_clip: dual-clip constant ``c > 1`` for negative advantages (``None``: off).
        aggregation: how per-token losses become a scalar (``llm_mdp.estimators``):
            ``seq-mean-token-sum`` is the unbiased estimate of ``grad J``.
        kl_coef: ``beta`` of the KL to a frozen reference copy of the initial policy
            (0 = no reference model is kept).
        kl_estimator: ``k1``, ``k2`` or ``k3`` (Schulman's estimators).
        kl_placement: ``"reward"`` (``-beta * KL`` added to every token's return-to-go:
            with ``k1`` an unbiased gradient of the reverse KL) or ``"loss"`` (``beta *
            aggregate(KL)`` added to the loss, GRPO's choice with ``k3``).
        entropy_coef: bonus ``-coef * entropy`` in the loss (0: off, and the exact
            entropy is then not computed; the logged ``entropy`` is always the Monte
            Carlo estimate ``-mean log pi(w_t | s_t)`` over the sampled tokens).
        temperature: temperature of the trained policy ``pi`` (its sampling and its
            log-probs); ``sampling_temperature`` samples from another one.
        checkpoint_every: save ``run_dir/checkpoint.pt`` every this many updates (0: only
            at the end of ``learn`` when ``run_dir`` is set).
        parallel: ``"dp"`` (every rank a full replica; one process when not distributed)
            or ``"fsdp"`` (models sharded over the ranks, sharded checkpoints in
            ``run_dir/checkpoint/``; :mod:`llm_mdp.fsdp`).
        mixed_precision: with ``"fsdp"``: bfloat16 compute, float32 reductions and
            AdamW state (updates then equal float32 ones only approximately).
    """

    seed: int = 0
    group_size: int = 1
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    epochs: int = 1
    minibatches: int = 1
    micro_batch_size: int | None = None
    loss: str = "vanilla"
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    aggregation: str = "seq-mean-token-sum"
    kl_coef: float = 0.0
    kl_estimator: str = "k1"
    kl_placement: Literal["reward", "loss"] = "reward"
    entropy_coef: float = 0.0
    temperature: float = 1.0
    checkpoint_every: int = 0
    parallel: str = "dp"
    mixed_precision: bool = False

    field_ranges: ClassVar[dict[str, Range]] = {
        "seed": Range(0),
        "group_size": Range(1),
        "learning_rate": Range(0, low_open=True),
        "weight_decay": Range(0),
        "adam_betas": Range(0, 1, high_open=True),
        "max_grad_norm": Range(0, low_open=True),
        "epochs": Range(1),
        "minibatches": Range(1),
        "micro_batch_size": Range(1),
        "clip_low": Range(0, low_open=True),
        "clip_high": Range(0, low_open=True),
        "dual_clip": Range(1, low_open=True),
        "kl_coef": Range(0),
        "entropy_coef": Range(0),
        "temperature": Range(0, low_open=True),
        "checkpoint_every": Range(0),
        "sampling_temperature": Range(0, low_open=True),
        "top_k": Range(0),
        "top_p": Range(0, 1, low_open=True),
        "dynamic_sampling_max_batches": Range(1),
        "overlong_cache": Range(0),
    }
    """Allowed values of the numeric fields (subclasses extend it); checked with the
    field types at construction, so a bad config fails before any work."""

    def __post_init__(self) -> None:
        check_fields(self, self.field_ranges)
        if self.aggregation not in est.AGGREGATION_MODES:
            raise ValueError(
                f"aggregation={self.aggregation!r}: expected one of "
                f"{', '.join(est.AGGREGATION_MODES)}"
            )
        for name, lookup in (("loss", est.get_policy_loss), ("kl_estimator", est.get_kl_estimator)):
            try:
                lookup(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}={getattr(self, name)!r}: {exc}") from None
        self.check_off_policy()
        if self.dynamic_sampling and self.group_size < 2:
            raise ValueError("dynamic_sampling=True needs group_size >= 2 (it filters groups)")
        if self.parallel not in fsdp.PARALLEL_MODES:
            raise ValueError(f"parallel={self.parallel!r}: expected one of {fsdp.PARALLEL_MODES}")
        if self.mixed_precision and self.parallel != "fsdp":
            raise ValueError("mixed_precision=True needs parallel='fsdp'")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AgentConfig:
        """Build from a plain dict (a config file); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)
