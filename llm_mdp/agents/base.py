"""The on-policy trainer every agent shares: collect -> advantages -> clipped/vanilla update.

An agent is a thin subclass that says how it collects episodes (groups, a greedy
baseline, Monte Carlo value rollouts) and which registered advantage estimator it uses;
the loop, the loss, KL handling, logging and checkpoints live here once.

Data parallel (``torchrun``, see :mod:`llm_mdp.distributed`): each rank runs this loop on
its shard of the global batch; counts and gradients are summed over ranks, so the
update equals the single-process one on the whole batch.

One update::

    batch = agent.collect()                 # through env.reset / env.step only
    adv   = agent.advantages(batch)         # a registered estimator (llm_mdp.estimators)
    adv  += KL-in-reward return-to-go        # if kl_placement == "reward"
    for epoch, minibatch, micro-batch:      # gradient accumulation with global counts
        loss = aggregate(policy_loss) + beta * aggregate(kl) [+ agent.extra_loss]

Dropout is disabled: the policy runs in ``eval()`` mode throughout (gradients still flow),
as is usual in RL fine-tuning, so rollout and training log-probs agree.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from llm_mdp import distributed, fsdp
from llm_mdp import estimators as est
from llm_mdp.agents.accounting import ForwardPositions
from llm_mdp.agents.checkpoint import agent_state, load_agent, restore_agent, save_agent
from llm_mdp.agents.config import AgentConfig
from llm_mdp.agents.interrupt import StopOnSignal, TrainingInterrupted
from llm_mdp.agents.logger import MetricsLogger
from llm_mdp.agents.offpolicy import (
    behavior_sampling,
    correct_loss,
    dynamic_sampling,
    overlong,
    prepare_behavior,
)
from llm_mdp.agents.rollout import Rollout, rollout
from llm_mdp.agents.streams import stream_ids
from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.policies import Policy
from llm_mdp.policies.base import match_action_set
from llm_mdp.validation import Range, check_type

STREAM_MAIN, STREAM_VALUE = 0, 1  # kinds of random streams (see Agent.streams)
STREAM_EVAL = 3  # evaluation on multi-turn tasks (see Agent.evaluate)
# metrics already summed over ranks: counters, and tokens per second (global tokens / time)
_GLOBAL_METRICS = frozenset(
    ("update", "samples", "tokens", "episodes", "generated_tokens", "forward_positions")
) | {"tokens_per_s"}


class TrainingError(RuntimeError):
    """Training stopped (for example a reward function failed); the message says where."""


class Agent:
    """Base of every agent: ``Agent(env, policy, config)``, ``learn``, ``save``, ``load``.

    Subclasses set ``name``, ``config_class`` and implement :meth:`advantages`; they may
    override :meth:`collect` and :meth:`extra_loss`.
    """

    name: ClassVar[str] = "agent"
    config_class: ClassVar[type[AgentConfig]] = AgentConfig
    keep_state: ClassVar[bool] = False  # collect() keeps Rollout.policy_state (TRePO)

    def __init__(
        self,
        env: LLMTokenVectorEnv,
        policy: Policy,
        config: AgentConfig | None = None,
        *,
        run_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                f"{type(self.config).__name__}"
            )
        cfg = self.config
        if not isinstance(env, LLMTokenVectorEnv):
            raise TypeError(
                f"agents drive an LLMTokenVectorEnv (gymnasium.make_vec), got {type(env).__name__}"
            )
        if env.autoreset_mode != AutoresetMode.DISABLED or env.backend != "torch":
            # rollouts step whole batches until every row ends and read the final
            # observation as the training batch: no row may restart underneath them
            raise ValueError(
                f"agents run whole synchronous batches of torch tensors, so the env needs "
                f"autoreset_mode='Disabled' and backend='torch' (LLMTokenVectorEnv's defaults); "
                f"got autoreset_mode={env.autoreset_mode.value!r}, backend={env.backend!r}. "
                "gymnasium.make_vec defaults to Gymnasium's 'NextStep' and 'numpy': pass "
                "autoreset_mode='Disabled', backend='torch' to it"
            )
        if env.num_envs % cfg.group_size:
            raise ValueError(
                f"env.num_envs={env.num_envs} is not a multiple of group_size={cfg.group_size}"
            )
        if policy.vocab_size != env.vocab_size:
            raise ValueError(
                f"vocabulary mismatch: the policy has {policy.vocab_size} actions, the env's "
                f"tokenizer {env.vocab_size}; build the policy for this task's tokenizer"
            )
        match_action_set(policy, env.tokenizer, env.action_mask, env.task.name)
        if fsdp.is_sharded(self._as_module(policy)):
            raise ValueError("this policy is already sharded (by another agent): build a new one")
        self.env, self.policy = env, policy
        self.dist = distributed.context()
        self.run_dir = Path(run_dir) if run_dir is not None and self.dist.is_main else None
        self._ckpt_dir = Path(run_dir) if run_dir is not None else None  # FSDP: every rank
        self.device = policy.device
        self.rng = np.random.default_rng(cfg.seed)  # shared by all ranks: same draws everywhere
        torch.manual_seed(cfg.seed)
        policy.seed(cfg.seed + self.dist.rank)
        policy.temperature = cfg.temperature
        self._as_module(policy).eval()
        self.ref_policy: Policy | None = None
        if cfg.kl_coef > 0:
            self.ref_policy = copy.deepcopy(policy)
            self._as_module(self.ref_policy).requires_grad_(False)
        self.modules: dict[str, torch.nn.Module] = {"policy": self._as_module(policy)}
        self.setup()
        if cfg.parallel == "fsdp":
            fsdp.shard_agent(self)  # may move the models' shards to the rank's GPU
            self.device = policy.device
        params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=cfg.adam_betas
        )
        self.update = 0
        self.samples = 0
        self.tokens = 0
        self.episodes = 0  # every episode generated, value and greedy rollouts included
        self.generated_tokens = 0  # every token any of those episodes generated
        self.forward_positions = 0  # token positions through the models' trunks
        ref = [] if self.ref_policy is None else [self._as_module(self.ref_policy)]
        self._forward = ForwardPositions([*self.modules.values(), *ref])
        self.history: list[dict[str, float]] = []
        self.refill = 0  # dynamic sampling's extra batches within one update

    # ------------------------------------------------------------------ hooks
    def setup(self) -> None:
        """Build extra trainable modules (register them in ``self.modules``)."""

    def collect(self) -> Rollout:
        """One batch of episodes: ``num_envs / G`` sampled prompts, each ``G`` times."""
        G = self.config.group_size
        idx = self.sample_prompts(self.env.num_envs // G)
        options = {"prompt_indices": idx, "group_size": G}
        streams = self.streams(STREAM_MAIN)
        return rollout(self.env, self.policy, options, streams=streams, keep_state=self.keep_state)

    def advantages(self, batch: Rollout) -> torch.Tensor:
        """Per-token weights ``(B, L)`` of ``grad log pi``; see ``llm_mdp.estimators``."""
        raise NotImplementedError

    def extra_loss(
        self, mb: Rollout, counts: dict[str, float]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """An additional loss term on a micro-batch (PPO's value loss); default none."""
        return torch.zeros((), device=self.device), {}

    def policy_log_probs(
        self, mb: Rollout, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss's ``(B, L)`` log-probs with gradient (and the entropy when asked);
        PPO's shared critic takes the trunk's hidden states from the same forward."""
        ids, attn, P = mb.input_ids, mb.attention_mask, mb.prompt_width
        if with_entropy:
            return self.policy.log_probs_and_entropy(ids, attn, P)
        return self.policy.log_probs(ids, attn, P), None

    def episodes_run(self) -> int:
        """Episodes this agent's envs have ended so far (compute accounting); an agent
        that runs episodes in envs of its own adds them."""
        return self.env.episodes_finished

    def tokens_generated_run(self) -> int:
        """Tokens this agent's envs have generated so far (compute accounting); an agent
        that runs episodes in envs of its own adds theirs."""
        return self.env.tokens_generated

    @property
    def policy_loss_name(self) -> str:
        """The registered policy loss the update uses (``config.loss``)."""
        return self.config.loss

    @property
    def kl_in_advantages(self) -> bool:
        """Whether the loop adds the KL-in-reward return-to-go to :meth:`advantages`.

        True for response-level estimators; an agent that folds the KL into its own
        token rewards (PPO, before GAE) returns False.
        """
        return True

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _as_module(policy: Any) -> torch.nn.Module:
        if not isinstance(policy, torch.nn.Module):
            raise TypeError(f"the policy must be a torch.nn.Module, got {type(policy).__name__}")
        return policy

    def sample_prompts(self, n: int) -> list[int]:
        """This rank's ``n`` prompt indices: its slice of ``n * world_size`` drawn uniformly
        with the generator every rank shares."""
        W, r = self.dist.world_size, self.dist.rank
        idx = self.rng.integers(0, len(self.env.task.prompts), size=n * W)
        return idx[r * n : (r + 1) * n].tolist()

    @property
    def global_rows(self) -> torch.Tensor:
        """``(num_envs,)`` the env rows' indices in the global batch (rank-major)."""
        B, r = self.env.num_envs, self.dist.rank
        return torch.arange(r * B, (r + 1) * B, device=self.env.device)

    def streams(self, kind: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Counter-based random streams for ``rows`` (default: this rank's global rows) in
        this update; ``kind`` separates main and value rollouts."""
        rows = self.global_rows if rows is None else rows
        key = (self.config.seed, self.update, kind) + ((self.refill,) if self.refill else ())
        return stream_ids(*key, rows=rows)

    def advantage_inputs(self, batch: Rollout, **kwargs: Any) -> est.AdvantageInputs:
        return est.AdvantageInputs(
            rewards=batch.rewards,
            mask=batch.response_mask,
            group_size=batch.group_size,
            **kwargs,
        )

    # ------------------------------------------------------------------ one update
    def train_step(self) -> dict[str, float]:
        """Collect one batch, compute advantages and update the policy; returns metrics."""
        cfg = self.config
        t0 = time.perf_counter()
        episodes_before = self.episodes_run()
        generated_before, forward_before = self.tokens_generated_run(), self._forward.count
        metrics: dict[str, float] = {}
        # a sharded policy is gathered for decoding only; behavior sampling (temperature,
        # top-k, top-p) is on for every rollout of the update
        with fsdp.gathered(self.policy), behavior_sampling(self.policy, cfg):
            batch = self.collect()
            overlong(cfg, batch, self.env.R)
            if cfg.dynamic_sampling:
                batch, ds_stats = dynamic_sampling(self, batch)
                metrics |= ds_stats
        if cfg.samples_off_policy or batch.behavior_logp is not None:
            prepare_behavior(self, batch)
        t1 = time.perf_counter()
        mask = batch.response_mask
        if self.ref_policy is not None:
            with torch.no_grad():
                batch.ref_logp = self.ref_policy.log_probs(
                    batch.input_ids, batch.attention_mask, batch.prompt_width
                )
        adv = self.advantages(batch).to(torch.float32)
        if self.ref_policy is not None:
            kl_tok = est.compute_kl(
                cfg.kl_estimator, batch.sample_logp, batch.require("ref_logp"), mask
            )
            metrics["kl/ref"] = float(kl_tok.sum(-1).mean())
            if cfg.kl_placement == "reward" and self.kl_in_advantages:
                adv = adv + est.discounted_returns(-cfg.kl_coef * kl_tok, mask).float()
        batch.advantages = adv
        metrics |= self.optimize(batch)
        t2 = time.perf_counter()

        local = [
            len(batch),
            float(mask.sum()),
            self.episodes_run() - episodes_before,
            self.tokens_generated_run() - generated_before,
            self._forward.count - forward_before,
        ]
        totals = self.dist.all_reduce(torch.tensor(local, dtype=torch.float64, device=self.device))
        n_seq, n_tok, n_ep, n_gen, n_fwd = (int(x) for x in totals.tolist())
        self.update += 1
        self.samples += n_seq
        self.tokens += n_tok
        self.episodes += n_ep
        self.generated_tokens += n_gen
        self.forward_positions += n_fwd
        r = batch.rewards
        return self.dist.reduce_metrics(
            {
                "update": self.update,
                "samples": self.samples,
                "tokens": self.tokens,
                "episodes": self.episodes,
                "generated_tokens": self.generated_tokens,
                "forward_positions": self.forward_positions,
                "reward/mean": float(r.mean()),
                "reward/std": float(r.std()) if len(r) > 1 else 0.0,
                "reward/max": float(r.max()),
                "reward/min": float(r.min()),
                "response/length": float(mask.sum(-1).float().mean()),
                "response/eos_frac": float(
                    batch.ended_with_eos(self.env.eos_token_id).float().mean()
                ),
                "advantage/mean": float((adv * mask).sum() / mask.sum().clamp(min=1)),
                **metrics,
                "time/rollout": t1 - t0,
                "time/update": t2 - t1,
                "tokens_per_s": n_tok / max(t2 - t0, 1e-9),
            },
            global_keys=_GLOBAL_METRICS,  # tokens_per_s: global tokens / this rank's time
            device=self.device,
        )

    def optimize(self, batch: Rollout) -> dict[str, float]:
        """``epochs`` x ``minibatches`` optimizer steps with gradient accumulation."""
        cfg = self.config
        B = len(batch)
        sums: dict[str, float] = {}
        n_steps = 0
        for _ in range(cfg.epochs):
            perm = self._permutation(B)
            for mb_rows in perm.chunk(cfg.minibatches):
                self.optimizer.zero_grad(set_to_none=True)
                stats = self.accumulate_gradients(batch.select(mb_rows))
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                if cfg.parallel != "fsdp":  # FSDP reduce-scatters (sums) in backward
                    self.dist.all_reduce_grads(params)
                norm = torch.nn.utils.clip_grad_norm_(
                    params, cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
                )
                stats["grad_norm"] = fsdp.grad_norm(norm)
                self.optimizer.step()
                n_steps += 1
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
        out = {k: v / n_steps for k, v in sums.items()}
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        return out

    def accumulate_gradients(self, mb: Rollout) -> dict[str, float]:
        """Backpropagate the minibatch loss micro-batch by micro-batch into ``.grad``.

        Every micro-batch is normalized by the *minibatch's* counts (sequences, tokens,
        the length cap) summed over ranks, so the accumulated gradient does not depend
        on ``micro_batch_size`` nor (after the all-reduce) on the world size.
        """
        n = torch.tensor([len(mb), float(mb.response_mask.sum())], dtype=torch.float64)
        n_seq, n_tok = self.dist.all_reduce(n.to(self.device)).tolist()
        counts = {"num_sequences": n_seq, "num_tokens": n_tok, "max_len": float(self.env.R)}
        stats: dict[str, float] = {}
        for micro in self._micro_batches(mb):
            loss, s = self.loss(micro, counts)
            loss.backward()
            for k, v in s.items():
                stats[k] = stats.get(k, 0.0) + v
        return stats

    def _permutation(self, n: int) -> torch.Tensor:
        if self.config.minibatches == 1:
            return torch.arange(n, device=self.device)
        return torch.as_tensor(self.rng.permutation(n), device=self.device)

    def _micro_batches(self, mb: Rollout) -> Iterator[Rollout]:
        size = self.config.micro_batch_size or len(mb)
        for lo in range(0, len(mb), size):
            yield mb.select(torch.arange(lo, min(lo + size, len(mb)), device=self.device))

    def loss(self, mb: Rollout, counts: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's share of the minibatch loss (normalized by global ``counts``)."""
        cfg = self.config
        mask = mb.response_mask
        # the exact entropy costs a (B, L, V) pass with gradient: only when in the loss
        logp, entropy = self.policy_log_probs(mb, with_entropy=bool(cfg.entropy_coef))

        def agg(x: torch.Tensor, mode: str = cfg.aggregation) -> torch.Tensor:
            return est.aggregate(x, mask, mode, **counts)

        name = self.policy_loss_name
        opts: dict[str, Any] = {}
        if name in ("ppo_clip", "gspo"):
            opts = {"clip_low": cfg.clip_low, "clip_high": cfg.clip_high}
        if name == "ppo_clip":
            opts["dual_clip"] = cfg.dual_clip
        opts |= cfg.loss_options
        out = est.get_policy_loss(name)(
            logp, mb.sample_logp, mb.require("advantages"), mask, **opts
        )
        out = correct_loss(cfg, out, mb)
        pg_loss = agg(out.loss)
        loss = pg_loss
        stats = {"loss/policy": float(pg_loss.detach())}
        if self.ref_policy is not None and cfg.kl_placement == "loss":
            kl = est.compute_kl(cfg.kl_estimator, logp, mb.require("ref_logp"), mask)
            kl_loss = cfg.kl_coef * agg(kl)
            loss = loss + kl_loss
            stats["loss/kl"] = float(kl_loss.detach())
        if entropy is not None:
            loss = loss - cfg.entropy_coef * agg(entropy)
        extra, extra_stats = self.extra_loss(mb, counts)
        loss = loss + extra
        stats |= extra_stats
        with torch.no_grad():
            # Monte Carlo entropy of the rollout policy: E[-log pi(w_t | s_t)] = H(pi(.|s_t))
            stats["entropy"] = float(agg(-mb.sample_logp, "token-mean"))
            stats["clip_frac"] = float(
                agg(out.stats.get("clipped", torch.zeros_like(logp)), "token-mean")
            )
            log_ratio = (logp - mb.sample_logp) * mask
            stats["approx_kl"] = float(agg(torch.expm1(log_ratio) - log_ratio, "token-mean"))
        stats["loss/total"] = float(loss.detach())
        return loss, stats

    # ------------------------------------------------------------------ the loop
    def learn(
        self,
        total_updates: int | None = None,
        *,
        total_tokens: int | None = None,
        total_generated_tokens: int | None = None,
        progress: bool = True,
        callback: Callable[[Agent, dict[str, float]], Any] | None = None,
    ) -> list[dict[str, float]]:
        """Train until ``self.update == total_updates``, ``total_tokens`` trained response
        tokens, or ``total_generated_tokens`` generated tokens, whichever comes first.

        ``total_generated_tokens`` counts every token any rollout generated (TRePO's value
        rollouts, ReMax's greedy baseline, dynamic-sampling refills): the budget that makes
        agents comparable at equal sampling cost. The update that crosses a token budget
        finishes. Targets are absolute, so a loaded checkpoint continues the same run. With a
        ``run_dir``, metrics go to ``metrics.csv`` (and TensorBoard when installed) and
        a checkpoint is written atomically every ``checkpoint_every`` updates and at the
        end; an agent loaded from a checkpoint drops the folder's metric rows past its
        update before logging, so no update is logged twice. Returns this call's metrics.

        Ctrl-C or SIGTERM finishes the running update, saves a checkpoint and raises
        :class:`~llm_mdp.agents.interrupt.TrainingInterrupted` (a ``KeyboardInterrupt``);
        so does a ``KeyboardInterrupt`` raised by ``callback``. If a reward function
        fails, training stops with :class:`TrainingError`; the last checkpoint is left
        as it was.
        """
        targets = {
            "total_updates": total_updates,
            "total_tokens": total_tokens,
            "total_generated_tokens": total_generated_tokens,
        }
        if all(v is None for v in targets.values()):
            raise ValueError("give total_updates, total_tokens or total_generated_tokens")
        for name, value in targets.items():
            if value is not None:
                check_type(name, value, int)
                Range(0).check(name, value)
        logger = MetricsLogger(
            self.run_dir,
            progress=progress and self.dist.is_main,
            desc=self.name,
            total=total_updates,
            start=self.update,
        )
        out: list[dict[str, float]] = []

        def more() -> bool:
            if total_updates is not None and self.update >= total_updates:
                return False
            generated = total_generated_tokens
            if generated is not None and self.generated_tokens >= generated:
                return False
            return total_tokens is None or self.tokens < total_tokens

        settled = True  # the state is a whole number of updates, logged: safe to save
        stop = StopOnSignal()
        try:
            with stop:
                while more():
                    settled = False
                    try:
                        m = self.train_step()
                    except Exception as exc:
                        ckpt = self.checkpoint_path
                        where = f"; last checkpoint: {ckpt}" if ckpt and ckpt.exists() else ""
                        raise TrainingError(
                            f"{self.name}: training stopped in update {self.update + 1}: "
                            f"{exc}{where}"
                        ) from exc
                    self.history.append(m)
                    out.append(m)
                    logger.log(m)
                    settled = True
                    if callback is not None:
                        callback(self, m)
                    every = self.config.checkpoint_every
                    if self.checkpoint_path and every and self.update % every == 0:
                        self.save(self.checkpoint_path)
                    if self._stop_requested(stop):
                        raise KeyboardInterrupt
            if self.checkpoint_path and out:
                self.save(self.checkpoint_path)
        except KeyboardInterrupt as exc:
            if isinstance(exc, TrainingInterrupted):
                raise
            saved = self.save(self.checkpoint_path) if settled and self.checkpoint_path else None
            raise TrainingInterrupted(
                self.update, saved, stop.signum or int(signal.SIGINT)
            ) from None
        finally:
            logger.close()
        return out

    def _stop_requested(self, stop: StopOnSignal) -> bool:
        """Whether a signal asked to stop, on any rank (every rank stops at the same update)."""
        flag = torch.tensor([float(stop.signum is not None)], device=self.device)
        return bool(self.dist.all_reduce(flag, "max").item())

    @property
    def checkpoint_path(self) -> Path | None:
        """``run_dir/checkpoint.pt`` (rank 0), or the sharded ``run_dir/checkpoint/``
        folder under FSDP (every rank writes its shards)."""
        if self.config.parallel == "fsdp":
            return None if self._ckpt_dir is None else self._ckpt_dir / "checkpoint"
        return None if self.run_dir is None else self.run_dir / "checkpoint.pt"

    @torch.no_grad()
    def evaluate(self, prompt_indices: list[int] | None = None, *, greedy: bool = True) -> float:
        """Mean reward over env batches covering ``prompt_indices`` (default: the pool).

        On a multi-turn task the draws (the environment's random replies, and the tokens
        unless ``greedy``) come from streams keyed by the seed and the prompt's position
        in the list: every evaluation meets the same replies, reproducibly."""
        from llm_mdp.agents.rollout import rollout_many

        idx = list(range(len(self.env.task.prompts))) if prompt_indices is None else prompt_indices
        state = self.policy.generator.get_state() if hasattr(self.policy, "generator") else None
        streams = None
        if self.env.task.multi_turn:
            rows = torch.arange(len(idx), device=self.env.device)
            streams = stream_ids(self.config.seed, STREAM_EVAL, rows=rows)
        with fsdp.gathered(self.policy):  # collective under FSDP: every rank evaluates
            rewards = rollout_many(
                self.env, self.policy, idx, [[] for _ in idx], greedy=greedy, streams=streams
            )
        if state is not None:  # evaluation does not perturb the training run
            self.policy.generator.set_state(state)  # type: ignore[attr-defined]
        return float(rewards.mean())

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (:func:`llm_mdp.agents.checkpoint.agent_state`)."""
        return agent_state(self)

    def extra_state(self) -> dict[str, Any]:
        """Agent-specific state to checkpoint (e.g. a running baseline)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`extra_state`."""

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a checkpoint atomically (temp file + rename): never a half-written file.
        Under FSDP a sharded folder, written by every rank (``llm_mdp.fsdp``)."""
        return save_agent(self, path)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (:func:`llm_mdp.agents.checkpoint.restore_agent`)."""
        restore_agent(self, state)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        env: LLMTokenVectorEnv,
        policy: Policy,
        *,
        run_dir: str | os.PathLike[str] | None = None,
        parallel: str | None = None,
    ) -> Agent:
        """Rebuild an agent from a checkpoint: config, weights, optimizer, RNG, counters.

        ``env`` and ``policy`` must be built as for the original run (same task and
        model architecture); the policy's weights are replaced by the checkpoint's. A
        sharded checkpoint (a folder) loads at any world size; ``parallel`` overrides the
        saved mode (e.g. ``"dp"`` to resume an FSDP run in one process). With ``run_dir``
        (usually the run's own folder), :meth:`learn` continues its ``metrics.csv`` after
        the checkpoint's update.

        Raises:
            CheckpointError: the file is missing, empty, truncated, not a checkpoint, or
                belongs to another agent, task or model (the message names the file).
        """
        return load_agent(cls, path, env, policy, run_dir=run_dir, parallel=parallel)
