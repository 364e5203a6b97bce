"""The token-level MDP of text generation, natively batched on torch.

State ``s_t`` = prompt + response tokens so far; action = the next token; the transition
appends it (deterministic, so the state graph is a tree). Under the Zero-Reward
Assumption every step pays 0.0 except the last, which pays the response-level reward
``RM(W)`` of the finished response (``docs/theory.md#the-token-mdp``).

Observation layout (every row, width ``W = P + R``)::

    input_ids       [pad pad p1 p2 p3 | w1 w2 pad pad pad]
    attention_mask  [ 0   0  1  1  1  |  1  1   0   0   0 ]
                     <---- P ------->   <------ R ------->

The prompt is right-aligned in the first ``P`` columns and the response grows
left-aligned from column ``P``. So the responses of a batch are ``input_ids[:, P:]``
with mask ``attention_mask[:, P:]``: the final observation *is* the training batch,
with no re-layout, and ``P`` is the same for every row.

A third key, ``policy_mask``, is 1 on the response tokens the policy chose and 0 on
prompt, padding and tokens the environment injected (multi-turn tasks); for a
single-turn task it equals ``attention_mask`` on the response columns.

An episode ends when the policy emits EOS (``terminated``) or when the response reaches
``max_response_tokens`` tokens. The length cap is part of the task (a finite-horizon
MDP), so by default it also reports ``terminated``; pass ``length_cap="truncated"`` if
you want time-limit semantics (SB3 then bootstraps a value at the cap).

Multi-turn: for a task with a ``reply_fn`` an EOS ends a *turn*; the env appends the
task's reply tokens within the same ``step`` (part of the transition, not actions;
``policy_mask`` 0) and the episode goes on until the reply is ``None``, the
``max_turns``-th EOS, or the length cap ``R`` (which counts replies too; a reply that
does not fit is cut there). The reward still comes at the end (or per turn as true
token rewards). Details in :mod:`llm_mdp.envs.turns` and ``docs/theory.md#multi-turn``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from llm_mdp.envs.prefixes import write_prefixes
from llm_mdp.envs.turns import answer_turns
from llm_mdp.tasks import ResponseBatch, Task, make_task
from llm_mdp.tasks.turns import describe_turns
from llm_mdp.utils import resolve_device

LengthCap = Literal["terminated", "truncated"]
Backend = Literal["torch", "numpy"]


class EnvStateError(RuntimeError):
    """``step`` called before ``reset`` or after every episode has ended."""


class LLMTokenVectorEnv(VectorEnv):
    """A batch of ``num_envs`` token-MDP episodes held as torch tensors on ``device``.

    Args:
        task: a :class:`~llm_mdp.tasks.Task` or the name of a built-in one.
        num_envs: batch size ``B``.
        max_response_tokens: length cap ``R`` (default: the task's). EOS counts.
        max_prompt_tokens: prompt width ``P`` (default: the longest prompt of the task's
            pool). A longer prompt given at reset raises ``ValueError``.
        length_cap: what reaching the cap reports, ``"terminated"`` (default: the cap is
            part of the task) or ``"truncated"`` (a time limit).
        device: where the state lives; ``"auto"`` picks CUDA when available.
        backend: ``"torch"`` (tensors in and out, the built-in agents' hot path) or
            ``"numpy"`` (arrays: use it with Gymnasium's vector wrappers, which expect
            NumPy, e.g. ``RecordEpisodeStatistics``).
        autoreset_mode: ``DISABLED`` (default here, and the mode the built-in agents
            require: they run whole synchronous batches; finished rows are frozen, their
            actions ignored, until ``reset``; ``terminated``/``truncated`` are True only
            on the step a row ends, as for Gymnasium's vector envs, while :attr:`done` /
            :attr:`all_done` keep the state), ``SAME_STEP`` (SB3-style: a finished row is
            reset within the same ``step``; its last observation is in
            ``info["final_obs"]``) or ``NEXT_STEP`` (Gymnasium's default, and the default
            of ``gymnasium.make_vec``, which also defaults to ``backend="numpy"``).
        info_text: put decoded prompt and response text in ``info`` when a row finishes.
        task_kwargs: forwarded to :func:`~llm_mdp.tasks.make_task` when ``task`` is a name.

    ``reset(seed=..., options=...)`` options (all optional):
        ``prompts``: list of prompt texts, or ``prompt_indices``: indices into
        ``task.prompts``; ``B / group_size`` entries. Default: sampled uniformly.
        ``group_size``: ``G``; each prompt fills ``G`` consecutive rows (GRPO groups).
        ``response_prefix``: per row a list of response token ids to start from, so any
        node of the response tree can be a start state (EOS not allowed inside; for a
        multi-turn task the prefix may hold finished turns and the environment's
        replies, and one that stops inside a reply is completed with the rest of it).
        ``reply_streams``: ``(n,)`` int64 counter-based stream ids, one per reset row:
        random replies then draw ``counter_uniforms(stream, EOS column)``, so a row's
        episode depends only on its streams (the agents' rollouts pass them); without,
        the env's own seeded generator draws.
        ``reset_mask``: bool ``(B,)``: reset only these rows (others keep their state).
    """

    metadata: dict[str, Any] = {  # noqa: RUF012
        "render_modes": ["ansi", "human"],
        "autoreset_mode": AutoresetMode.DISABLED,
    }

    def __init__(
        self,
        task: Task | str,
        num_envs: int = 1,
        *,
        max_response_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
        length_cap: LengthCap = "terminated",
        device: str | torch.device = "cpu",
        backend: Backend = "torch",
        autoreset_mode: AutoresetMode | str = AutoresetMode.DISABLED,
        info_text: bool = True,
        render_mode: str | None = None,
        task_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.task = make_task(task, **(task_kwargs or {})) if isinstance(task, str) else task
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs}, expected >= 1")
        if length_cap not in ("terminated", "truncated"):
            raise ValueError(f"length_cap={length_cap!r}, expected 'terminated' or 'truncated'")
        if backend not in ("torch", "numpy"):
            raise ValueError(f"backend={backend!r}, expected 'torch' or 'numpy'")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode={render_mode!r}, expected one of {self.metadata['render_modes']}"
            )
        self.length_cap: LengthCap = length_cap
        self.backend: Backend = backend
        self.device = resolve_device(device)
        self.info_text = info_text
        self.render_mode = render_mode
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}

        tok = self.task.tokenizer
        self.tokenizer = tok
        self.vocab_size = len(tok)
        self.eos_token_id = int(tok.eos_token_id)
        self.pad_token_id = int(tok.pad_token_id)
        R = self.task.max_response_tokens if max_response_tokens is None else max_response_tokens
        if isinstance(R, bool) or not isinstance(R, int | np.integer) or R < 1:
            raise ValueError(f"max_response_tokens={R!r}, expected an integer >= 1")
        self.R = int(R)
        # the action set (tasks.illegal_action_ids): special tokens other than EOS are not
        # actions, so no policy can score by emitting tokens the reward's decoding drops
        self.action_mask = self.task.action_mask.to(self.device)
        self._has_illegal = not bool(self.action_mask.all())

        pool = [self._encode_prompt(p) for p in self.task.prompts]
        longest = max(len(p) for p in pool)
        if max_prompt_tokens is not None and (
            isinstance(max_prompt_tokens, bool)
            or not isinstance(max_prompt_tokens, int | np.integer)
            or max_prompt_tokens < 1
        ):
            raise ValueError(f"max_prompt_tokens={max_prompt_tokens!r}, expected an integer >= 1")
        self.P = int(longest if max_prompt_tokens is None else max_prompt_tokens)
        if longest > self.P:
            i = max(range(len(pool)), key=lambda j: len(pool[j]))
            raise ValueError(
                f"prompt #{i} {self.task.prompts[i]!r} has {longest} tokens, more than "
                f"max_prompt_tokens={self.P}"
            )
        self.W = self.P + self.R
        self._pool_ids, self._pool_mask = self._left_pad(pool)

        self.single_action_space = gym.spaces.Discrete(self.vocab_size)
        self.single_observation_space = gym.spaces.Dict(
            {
                "input_ids": gym.spaces.Box(0, self.vocab_size - 1, (self.W,), np.int64),
                "attention_mask": gym.spaces.Box(0, 1, (self.W,), np.int64),
                "policy_mask": gym.spaces.Box(0, 1, (self.W,), np.int64),
            }
        )
        self._allocate_rows(num_envs)
        self._np_random, self._np_random_seed = gym.utils.seeding.np_random(None)

    def _allocate_rows(self, num_envs: int) -> None:
        """Everything that has one entry per row (state, spaces, counters), fresh."""
        self.num_envs = B = num_envs
        self.action_space = batch_space(self.single_action_space, B)
        self.observation_space = batch_space(self.single_observation_space, B)
        kw: dict[str, Any] = {"device": self.device}
        self.ids = torch.full((B, self.W), self.pad_token_id, dtype=torch.long, **kw)
        self.mask = torch.zeros((B, self.W), dtype=torch.long, **kw)
        self.policy_flags = torch.zeros((B, self.W), dtype=torch.long, **kw)
        self.turns = torch.zeros(B, dtype=torch.long, **kw)  # turns the policy finished
        self.reply_streams: torch.Tensor | None = None  # see the reset option
        self.has_reply_stream = torch.zeros(B, dtype=torch.bool, **kw)
        self.response_len = torch.zeros(B, dtype=torch.long, **kw)
        self.prompt_index = torch.full((B,), -1, dtype=torch.long, **kw)
        self.terminated = torch.zeros(B, dtype=torch.bool, **kw)
        self.truncated = torch.zeros(B, dtype=torch.bool, **kw)
        self._autoreset_pending = torch.zeros(B, dtype=torch.bool, **kw)
        self._rows = torch.arange(B, **kw)
        self._has_reset = False
        self.episodes_finished = 0  # episodes ended since construction (compute accounting)
        # actions appended to running rows since construction (compute accounting); a
        # device tensor, so counting costs no host sync per step
        self._tokens_generated = torch.zeros((), dtype=torch.long, **kw)

    def resized(self, num_envs: int) -> LLMTokenVectorEnv:
        """A fresh env like this one (task, widths, device, settings) with ``num_envs`` rows.

        Shares the encoded prompt pool and the action mask instead of building them again
        (TRePO's value rollouts need an env of a new size almost every update).
        """
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs}, expected >= 1")
        env = copy.copy(self)
        env.info_text = False
        env._allocate_rows(num_envs)
        env._np_random, env._np_random_seed = gym.utils.seeding.np_random(None)
        return env

    # ------------------------------------------------------------------ properties
    @property
    def tokens_generated(self) -> int:
        """Tokens appended to running rows by :meth:`step` since construction: every
        action an episode took, EOS included (compute accounting)."""
        return int(self._tokens_generated)

    @property
    def done(self) -> torch.Tensor:
        """``(B,)`` bool: rows whose episode has ended (terminated or truncated)."""
        return self.terminated | self.truncated

    @property
    def all_done(self) -> bool:
        """Whether every row has ended (one host sync)."""
        return bool(self.done.all())

    # ------------------------------------------------------------------ reset
    def reset(
        self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        if isinstance(seed, list):  # Gymnasium passes one seed per sub-env; we have one sampler
            seed = seed[0]
        if seed is not None:
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
        options = dict(options or {})
        known = {
            "prompts",
            "prompt_indices",
            "group_size",
            "response_prefix",
            "reply_streams",
            "reset_mask",
        }
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; known: {sorted(known)}")
        rows = self._rows
        if options.get("reset_mask") is not None:
            m = torch.as_tensor(np.asarray(options["reset_mask"]), dtype=torch.bool)
            if m.shape != (self.num_envs,):
                raise ValueError(
                    f"reset_mask has shape {tuple(m.shape)}, expected ({self.num_envs},)"
                )
            rows = rows[m.to(self.device)]
        self._reset_rows(rows, options)
        self._has_reset = True
        return self._obs(), {}

    def _reset_rows(self, rows: torch.Tensor, options: dict[str, Any]) -> None:
        n = int(rows.numel())
        if n == 0:
            return
        G = int(options.get("group_size") or 1)
        if G < 1 or n % G:
            raise ValueError(f"group_size={G} must be >= 1 and divide the {n} rows being reset")
        ids, pmask, index = self._prompt_rows(options, n // G)
        if G > 1:
            ids, pmask, index = (x.repeat_interleave(G, 0) for x in (ids, pmask, index))
        self.ids[rows] = self.pad_token_id
        self.mask[rows] = 0
        self.policy_flags[rows] = 0
        self.turns[rows] = 0
        self.ids[rows, : self.P] = ids
        self.mask[rows, : self.P] = pmask
        self.prompt_index[rows] = index
        self.response_len[rows] = 0
        self.terminated[rows] = False
        self.truncated[rows] = False
        self._autoreset_pending[rows] = False
        self._set_reply_streams(rows, options.get("reply_streams"))
        prefix = options.get("response_prefix")
        if prefix is not None:
            write_prefixes(self, rows, prefix)

    def _prompt_rows(
        self, options: dict[str, Any], n: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prompts, indices = options.get("prompts"), options.get("prompt_indices")
        if prompts is not None and indices is not None:
            raise ValueError("give either 'prompts' or 'prompt_indices' at reset, not both")
        if prompts is not None:
            if isinstance(prompts, str):
                if n != 1:
                    raise ValueError(
                        f"prompts={prompts!r} is one text, expected a list of {n} prompt texts"
                    )
                prompts = [prompts]
            prompts = list(prompts)
            if len(prompts) != n:
                raise ValueError(f"got {len(prompts)} prompt(s), expected {n} (rows / group_size)")
            encoded = [self._encode_prompt(p, check_width=True) for p in prompts]
            ids, mask = self._left_pad(encoded)
            return ids, mask, torch.full((n,), -1, dtype=torch.long, device=self.device)
        if indices is None:
            indices = self.np_random.integers(0, len(self.task.prompts), size=n)
        arr = np.asarray(indices)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise TypeError(
                f"prompt_indices must be integers, got {indices!r:.80} (dtype {arr.dtype})"
            )
        idx = torch.as_tensor(arr, dtype=torch.long).reshape(-1)
        if idx.numel() != n:
            raise ValueError(
                f"got {idx.numel()} prompt index(es), expected {n} (rows / group_size)"
            )
        bad = (idx < 0) | (idx >= len(self.task.prompts))
        if bool(bad.any()):
            raise ValueError(
                f"prompt index {int(idx[bad][0])} is outside the task's pool of "
                f"{len(self.task.prompts)} prompts"
            )
        idx = idx.to(self.device)
        return self._pool_ids[idx], self._pool_mask[idx], idx

    def _set_reply_streams(self, rows: torch.Tensor, streams: Any) -> None:
        if streams is None:
            self.has_reply_stream[rows] = False
            return
        s = torch.as_tensor(streams, device=self.device)
        if s.dtype != torch.long or s.shape != (rows.numel(),):
            raise ValueError(
                f"reply_streams must be ({rows.numel()},) int64 stream ids, one per reset row; "
                f"got shape {tuple(s.shape)} dtype {s.dtype}"
            )
        if self.reply_streams is None:
            self.reply_streams = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self.reply_streams[rows] = s
        self.has_reply_stream[rows] = True

    # ------------------------------------------------------------------ step
    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        if not self._has_reset:
            raise EnvStateError("step() called before reset(); call env.reset() first")
        a = self._check_actions(actions)
        info: dict[str, Any] = {}

        # NEXT_STEP autoreset: rows that ended on the previous step restart now and
        # ignore this step's action
        active = ~(self.terminated | self.truncated)
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            just_reset = self._autoreset_pending.clone()
            if bool(just_reset.any()):
                self._reset_rows(self._rows[just_reset], {})
            active = ~(self.terminated | self.truncated) & ~just_reset
        elif self.autoreset_mode == AutoresetMode.DISABLED and not bool(active.any()):
            raise EnvStateError(
                "step() called after every episode ended; call reset() to start new episodes"
            )
        # transition: append the action to every running row (frozen rows rewrite what
        # they hold), with no data-dependent indexing and so no host sync
        col = (self.response_len.clamp(max=self.R - 1) + self.P).unsqueeze(1)
        self.ids.scatter_(
            1, col, torch.where(active, a, self.ids.gather(1, col).squeeze(1)).unsqueeze(1)
        )
        self.mask.scatter_(1, col, (self.mask.gather(1, col).squeeze(1) | active).unsqueeze(1))
        flags = self.policy_flags
        flags.scatter_(1, col, (flags.gather(1, col).squeeze(1) | active).unsqueeze(1))
        self.response_len += active
        self._tokens_generated += active.sum()
        ended_eos = active & (a == self.eos_token_id)
        if self.task.multi_turn and bool(ended_eos.any()):
            # the env's replies are part of this transition: appended now, and only the
            # EOS tokens they do not answer end the episode
            ended_eos = answer_turns(self, ended_eos)
        finished = active & (ended_eos | (self.response_len >= self.R))
        if self.length_cap == "terminated":
            self.terminated |= finished
        else:
            self.terminated |= ended_eos
            self.truncated |= finished & ~ended_eos

        # Zero-Reward Assumption: 0.0 on every step but the last
        reward = torch.zeros(self.num_envs, dtype=torch.float64, device=self.device)
        if bool(finished.any()):
            done_rows = self._rows[finished]
            self.episodes_finished += int(done_rows.numel())
            batch = self.response_batch(done_rows)
            reward[done_rows] = self.task.score(batch).to(self.device)
            self._finish_info(info, done_rows, batch, reward)
        # the flags report the step a row ends; ``self.done`` keeps the state
        terminated, truncated = self.terminated & finished, self.truncated & finished
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            self._autoreset_pending = finished
        if self.autoreset_mode == AutoresetMode.SAME_STEP and bool(finished.any()):
            info["final_obs"] = self._obs()
            info["_final_obs"] = self._to_backend(finished)
            self._reset_rows(self._rows[finished], {})
        if self.render_mode == "human":
            print(self.render_text())
        return (
            self._obs(),
            self._to_backend(reward),
            self._to_backend(terminated),
            self._to_backend(truncated),
            info,
        )

    def _check_actions(self, actions: Any) -> torch.Tensor:
        if isinstance(actions, torch.Tensor):
            a = actions
        else:
            arr = np.asarray(actions)
            if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(
                    f"actions must be integer token ids, got dtype {arr.dtype} ({actions!r:.80})"
                )
            a = torch.from_numpy(arr.astype(np.int64, copy=False))
        if a.dtype.is_floating_point or a.dtype == torch.bool or a.is_complex():
            raise TypeError(f"actions must be integer token ids, got dtype {a.dtype}")
        a = a.reshape(-1) if a.dim() == 0 else a
        if a.shape != (self.num_envs,):
            raise ValueError(f"actions have shape {tuple(a.shape)}, expected ({self.num_envs},)")
        if a.device != self.device or a.dtype != torch.long:
            a = a.to(self.device, torch.long)
        lo, hi = torch.stack(a.aminmax()).tolist()  # one host sync
        if lo < 0 or hi >= self.vocab_size:
            bad = (a < 0) | (a >= self.vocab_size)
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"action {int(a[i])} (row {i}) is outside the vocabulary [0, {self.vocab_size})"
            )
        if self._has_illegal:  # only tokenizers with special tokens besides EOS pay this sync
            bad = ~self.action_mask[a] & ~self.done
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                t = int(a[i])
                raise ValueError(
                    f"action {t} (row {i}) is {self._token_name(t)}, a special token that is "
                    "not an action of this MDP (only EOS is); see env.action_mask / "
                    "env.action_masks()"
                )
        return a

    def action_masks(self) -> Any:
        """``(num_envs, vocab_size)`` bool: the legal actions of every row.

        The same for every row and step (special tokens other than EOS are never legal);
        the method exists under the name that sb3-contrib's ``MaskablePPO`` looks for.
        """
        return self._to_backend(self.action_mask.expand(self.num_envs, -1).clone())

    def _token_name(self, token_id: int) -> str:
        return repr(self.tokenizer.convert_ids_to_tokens(int(token_id)))

    def _finish_info(
        self, info: dict[str, Any], rows: torch.Tensor, batch: ResponseBatch, reward: torch.Tensor
    ) -> None:
        finished = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        finished[rows] = True
        info["_episode_end"] = self._to_backend(finished)
        info["episode_end"] = self._to_backend(finished)
        if self.info_text:
            for key, texts in (("prompt", batch.prompts), ("response", batch.responses)):
                arr = np.full(self.num_envs, None, dtype=object)
                arr[rows.cpu().numpy()] = texts
                info[key], info["_" + key] = arr, finished.cpu().numpy()
        token_rewards = self.task.true_token_rewards(batch)
        if token_rewards is not None:
            full = torch.zeros((self.num_envs, self.R), dtype=torch.float64, device=self.device)
            full[rows, : token_rewards.shape[1]] = token_rewards.to(self.device)
            info["token_rewards"] = self._to_backend(full)
            info["_token_rewards"] = self._to_backend(finished)

    # ------------------------------------------------------------------ helpers
    def response_batch(self, rows: torch.Tensor | None = None) -> ResponseBatch:
        """The current prompts and responses of ``rows`` (default all) as a reward batch."""
        r = self._rows if rows is None else rows
        return ResponseBatch(
            prompt_ids=self.ids[r, : self.P],
            prompt_mask=self.mask[r, : self.P],
            response_ids=self.ids[r, self.P :],
            response_mask=self.mask[r, self.P :],
            prompt_indices=self.prompt_index[r],
            tokenizer=self.tokenizer,
            policy_mask=self.policy_flags[r, self.P :],
        )

    def _encode_prompt(self, text: str, check_width: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}: {text!r:.80}")
        try:
            ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        except Exception as exc:
            raise ValueError(f"cannot tokenize prompt {text!r}: {exc}") from exc
        if not ids:
            raise ValueError(f"prompt {text!r} encodes to no tokens; a state needs a prompt")
        if check_width and len(ids) > self.P:
            raise ValueError(
                f"prompt {text!r} has {len(ids)} tokens, more than max_prompt_tokens={self.P}; "
                "build the env with a larger max_prompt_tokens"
            )
        return ids

    def _left_pad(self, seqs: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(seqs), self.P), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), self.P), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, self.P - len(s) :] = torch.tensor(s)
            mask[i, self.P - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _obs(self) -> Any:
        return {
            "input_ids": self._to_backend(self.ids.clone()),
            "attention_mask": self._to_backend(self.mask.clone()),
            "policy_mask": self._to_backend(self.policy_flags.clone()),
        }

    def _to_backend(self, x: torch.Tensor) -> Any:
        return x.cpu().numpy() if self.backend == "numpy" else x

    # ------------------------------------------------------------------ render
    def render_text(self, rows: Sequence[int] | None = None) -> str:
        """One line per row: ``prompt | response so far`` and the row's status; for a
        multi-turn task the response is shown turn by turn (``policy: ... | env: ...``,
        special tokens kept so EOS marks where the policy ended a turn)."""
        lines = []
        ids, mask = self.ids.tolist(), self.mask.tolist()
        flags = self.policy_flags.tolist() if self.task.multi_turn else None
        for i in rows if rows is not None else range(self.num_envs):
            toks = [t for t, m in zip(ids[i], mask[i], strict=True) if m]
            n_prompt = sum(mask[i][: self.P])
            prompt = self.tokenizer.decode(toks[:n_prompt])
            status = "truncated" if self.truncated[i] else "running"
            status = "terminated" if self.terminated[i] else status
            if flags is None:
                response = repr(self.tokenizer.decode(toks[n_prompt:]))
            else:
                n = int(self.response_len[i])
                resp = slice(self.P, self.P + n)
                response = describe_turns(self.tokenizer, ids[i][resp], flags[i][resp])
                status += f", turn {int(self.turns[i])}"
            lines.append(f"[{i}] {prompt!r} | {response} ({status})")
        return "\n".join(lines)

    def render(self) -> Any:
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='ansi'")
            return None
        text = self.render_text()
        if self.render_mode == "human":
            print(text)
            return None
        return text
