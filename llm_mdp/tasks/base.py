"""Tasks: a prompt source plus a response-level reward ``RM(W)``.

A :class:`Task` is everything the token MDP needs that is not the policy: the prompts
``w_0``, the tokenizer that maps text to the action space, the response-level reward
model, and (optionally) the true token-level rewards ``r_t`` that the Zero-Reward
Assumption hides from the learner (``docs/theory.md#the-token-mdp``).

Reward functions are *batched*: they receive a :class:`ResponseBatch` holding every
response that finished on one env step, with token ids and (lazily decoded) text, and
return one number per response.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import compress
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from llm_mdp.tasks.turns import ReplyFn, TurnState, replay_turns

RewardOutput = torch.Tensor | Sequence[float]


@dataclass
class ResponseBatch:
    """A batch of finished (or partial) responses handed to a reward function.

    Shapes: ``n`` responses, prompts left-padded to width ``P``, responses right-padded
    to width ``R``. Text is decoded only when a reward function asks for it.

    Attributes:
        prompt_ids: ``(n, P)`` int64, left-padded with the tokenizer's pad id.
        prompt_mask: ``(n, P)`` int64, 1 on real prompt tokens.
        response_ids: ``(n, R)`` int64, right-padded.
        response_mask: ``(n, R)`` int64, 1 on real response tokens (EOS included).
        prompt_indices: ``(n,)`` int64 index into ``Task.prompts``; -1 for a prompt
            given as free text at reset.
        tokenizer: decodes ids to text.
        policy_mask: ``(n, R)`` int64, 1 on the tokens the policy chose, 0 on tokens the
            environment injected (multi-turn tasks, :mod:`llm_mdp.tasks.turns`) and on
            padding; ``None`` means every real response token is the policy's.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    prompt_indices: torch.Tensor
    tokenizer: PreTrainedTokenizerBase
    policy_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.response_ids.shape[0])

    @cached_property
    def prompts(self) -> list[str]:
        """Prompt texts (special tokens removed)."""
        return _decode(self.tokenizer, self.prompt_ids, self.prompt_mask)

    @cached_property
    def responses(self) -> list[str]:
        """Response texts (special tokens such as EOS removed)."""
        return _decode(self.tokenizer, self.response_ids, self.response_mask)

    @cached_property
    def response_lengths(self) -> torch.Tensor:
        """``(n,)`` number of response tokens, EOS included."""
        return self.response_mask.sum(-1)

    def response_token_lists(self) -> list[list[int]]:
        """Response ids as Python lists without padding (EOS kept)."""
        lengths = self.response_lengths.tolist()
        rows = self.response_ids.tolist()
        return [row[:n] for row, n in zip(rows, lengths, strict=True)]


def _decode(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    rows = ids.tolist()
    keep = mask.bool().tolist()
    seqs = [tuple(compress(r, m)) for r, m in zip(rows, keep, strict=True)]
    # ``decode`` per row gives what ``batch_decode`` gives, ~15x faster on short rows
    # (``batch_decode`` first walks the nested lists element by element); each distinct
    # row once: TRePO's value rollouts repeat a few prompts (and often responses) many times
    text = {s: str(tokenizer.decode(list(s), skip_special_tokens=True)) for s in set(seqs)}
    return [text[s] for s in seqs]


RewardFn = Callable[[ResponseBatch], RewardOutput]
"""A batched response-level reward model ``RM(W)``: one number per response."""

TokenRewardFn = Callable[[ResponseBatch], torch.Tensor]
"""True token-level rewards ``r_t``: ``(n, R)`` float, zero on padding."""


@dataclass
class Task:
    """A prompt source and a response-level reward, with everything the env needs.

    Args:
        name: short identifier, used in logs and registered env ids.
        prompts: the prompt pool ``w_0`` (text). Reset samples from it uniformly unless
            given explicit prompts.
        reward_fn: batched ``RM(W)``; see :data:`RewardFn`.
        tokenizer: maps text to token ids; its vocabulary is the action space. Must
            define ``eos_token_id`` and ``pad_token_id``.
        max_response_tokens: default length cap ``T_max`` of a response (EOS counts).
        token_reward_fn: optional true token-level rewards ``r_t``. When given,
            ``reward_fn`` must equal ``sum_t gamma^(t-1) r_t`` (the Theorem 1 set-up);
            the env reports them in ``info`` so a learner can check that identity.
        gamma: discount the token rewards are summed with to give ``RM(W)``.
        optimal_reward: the best achievable expected reward, when known.
        random_reward: the expected reward of a uniformly random policy, when known.
        description: one line for ``--help`` and docs.
        reply_fn: makes the task multi-turn: called when the policy ends a turn (EOS)
            with the conversation so far, returns the environment's reply tokens (not
            actions), a random reply as ``(probability, ids)`` outcomes, or ``None`` to
            end the episode (:mod:`llm_mdp.tasks.turns`). ``max_response_tokens`` then
            caps the whole conversation after the prompt, replies included.
        max_turns: the most turns the policy may take (the episode ends at the
            ``max_turns``-th EOS); ``None``: only ``reply_fn`` and the length cap end it.
    """

    name: str
    prompts: Sequence[str]
    reward_fn: RewardFn
    tokenizer: PreTrainedTokenizerBase
    max_response_tokens: int = 16
    token_reward_fn: TokenRewardFn | None = None
    gamma: float = 1.0
    optimal_reward: float | None = None
    random_reward: float | None = None
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    reply_fn: ReplyFn | None = None
    max_turns: int | None = None

    def __post_init__(self) -> None:
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"task {self.name!r}: max_turns={self.max_turns}, expected >= 1")
        if len(self.prompts) == 0:
            raise ValueError(f"task {self.name!r}: the prompt pool is empty")
        if self.max_response_tokens < 1:
            raise ValueError(
                f"task {self.name!r}: max_response_tokens={self.max_response_tokens}, expected >= 1"
            )
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"task {self.name!r}: gamma={self.gamma}, expected 0 < gamma <= 1")
        check_tokenizer(self.tokenizer)

    @property
    def multi_turn(self) -> bool:
        """True when the environment answers finished turns (``reply_fn`` is set)."""
        return self.reply_fn is not None

    def replay(
        self, prompt_index: int, prompt_ids: Sequence[int], response_ids: Sequence[int]
    ) -> TurnState:
        """Which tokens of ``response_ids`` the environment injected, and where the
        response stands in its turns (:func:`~llm_mdp.tasks.turns.replay_turns`). For a
        single-turn task every token is the policy's."""
        if self.reply_fn is None:
            n = len(response_ids)
            ended = n > 0 and int(response_ids[-1]) == self.tokenizer.eos_token_id
            return TurnState((True,) * n, int(ended), 1.0, (), ended)
        return replay_turns(
            self.reply_fn,
            prompt_index=prompt_index,
            prompt_ids=prompt_ids,
            response_ids=response_ids,
            eos_token_id=int(self.tokenizer.eos_token_id),
            tokenizer=self.tokenizer,
            max_turns=self.max_turns,
        )

    @property
    def vocab_size(self) -> int:
        """Size of the action space: ``len(tokenizer)``."""
        return len(self.tokenizer)

    @cached_property
    def action_mask(self) -> torch.Tensor:
        """``(vocab_size,)`` bool, True on legal actions: every token but the special
        tokens other than EOS (:func:`legal_action_mask`)."""
        return legal_action_mask(self.tokenizer)

    @classmethod
    def from_text_fn(
        cls,
        name: str,
        prompts: Sequence[str],
        fn: Callable[[list[str], list[str]], RewardOutput],
        tokenizer: PreTrainedTokenizerBase,
        **kwargs: Any,
    ) -> Task:
        """Wrap any user callable ``fn(prompts, responses) -> rewards`` over text."""

        def reward_fn(batch: ResponseBatch) -> RewardOutput:
            return fn(batch.prompts, batch.responses)

        reward_fn.__qualname__ = getattr(fn, "__qualname__", "reward_fn")
        return cls(name=name, prompts=prompts, reward_fn=reward_fn, tokenizer=tokenizer, **kwargs)

    def score(self, batch: ResponseBatch) -> torch.Tensor:
        """Call ``reward_fn`` and check its output: ``(n,)`` float64, finite.

        Raises:
            RewardError: the reward function raised, returned the wrong count, a
                non-number, NaN or inf. The message names the offending prompt/response.
        """
        try:
            out = self.reward_fn(batch)
        except Exception as exc:
            raise RewardError(
                f"task {self.name!r}: reward function {_fn_name(self.reward_fn)} raised "
                f"{type(exc).__name__}: {exc} while scoring {len(batch)} response(s); first: "
                f"{_describe(batch, 0)}"
            ) from exc
        return _check_rewards(self.name, out, batch)

    def true_token_rewards(self, batch: ResponseBatch) -> torch.Tensor | None:
        """True token rewards ``(n, R)`` float64 if the task has them, else ``None``."""
        if self.token_reward_fn is None:
            return None
        r = torch.as_tensor(self.token_reward_fn(batch), dtype=torch.float64)
        if r.shape != batch.response_ids.shape:
            raise RewardError(
                f"task {self.name!r}: token_reward_fn returned shape {tuple(r.shape)}, "
                f"expected {tuple(batch.response_ids.shape)}"
            )
        return r * batch.response_mask.to(r.dtype).to(r.device)


class RewardError(RuntimeError):
    """A reward function failed or returned something that is not a finite number."""


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _describe(batch: ResponseBatch, i: int) -> str:
    try:
        return f"prompt={batch.prompts[i]!r}, response={batch.responses[i]!r}"
    except Exception:  # decoding itself failed: fall back to ids
        return f"response_ids={batch.response_ids[i].tolist()}"


def _check_rewards(task: str, out: Any, batch: ResponseBatch) -> torch.Tensor:
    n = len(batch)
    try:
        if isinstance(out, torch.Tensor):
            rewards = out.detach().to("cpu", torch.float64).reshape(-1)
        else:
            values = list(out)
            for i, v in enumerate(values):
                if isinstance(v, bool) or (
                    not isinstance(v, int | float) and not hasattr(v, "__float__")
                ):
                    raise RewardError(
                        f"task {task!r}: reward #{i} is {v!r} of type {type(v).__name__}, "
                        f"expected a number; {_describe(batch, i)}"
                    )
            rewards = torch.tensor([float(v) for v in values], dtype=torch.float64)
    except RewardError:
        raise
    except Exception as exc:
        raise RewardError(
            f"task {task!r}: reward function returned {type(out).__name__}, expected a "
            f"sequence of {n} numbers or a tensor of shape ({n},)"
        ) from exc
    if rewards.numel() != n:
        raise RewardError(
            f"task {task!r}: reward function returned {rewards.numel()} value(s) for {n} "
            f"response(s); expected exactly one per response"
        )
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise RewardError(
            f"task {task!r}: reward #{i} is {rewards[i].item()} (not finite); {_describe(batch, i)}"
        )
    return rewards


def illegal_action_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that are *not* actions of the token MDP: special tokens other than EOS.

    The rule (one source for the env, the samplers, log-probs and the exact toolkit):
    a token is a legal action unless it is a special token that is not EOS. Special
    tokens (``<pad>``, ``<unk>``, a chat template's ``<|im_start|>``, ...) are dropped by
    ``decode(..., skip_special_tokens=True)``, which is how reward functions read text;
    if they were actions, a policy could emit them as invisible no-ops that the reward
    never sees (and learn to fill the length cap with them instead of stopping). So they
    are masked out: policies give them probability 0 and the env rejects them. EOS stays
    an action even when it doubles as the pad token (GPT-2 style; the built-in character
    tokenizers do this, so every id of theirs is legal).

    Ids at or past ``len(tokenizer)`` do not exist and are not listed.
    """
    eos = tokenizer.eos_token_id
    special = set(tokenizer.all_special_ids)
    special.update(
        int(i)
        for i, tok in tokenizer.added_tokens_decoder.items()
        if getattr(tok, "special", False)
    )
    return sorted(i for i in special if i != eos and 0 <= i < len(tokenizer))


def legal_action_mask(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """``(len(tokenizer),)`` bool: True for every legal action (see :func:`illegal_action_ids`)."""
    mask = torch.ones(len(tokenizer), dtype=torch.bool)
    mask[illegal_action_ids(tokenizer)] = False
    return mask


def check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise a clear error when a tokenizer cannot drive the env (no EOS or no pad)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token_id: the MDP needs an "
            "end-of-sequence action. Set tokenizer.eos_token = '...' first."
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no pad_token_id: observations are "
            "padded to a fixed width. Set tokenizer.pad_token (often to the EOS token)."
        )
