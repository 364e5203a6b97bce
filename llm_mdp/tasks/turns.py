"""Multi-turn episodes: the environment answers a finished turn with tokens of its own.

In the token MDP a multi-turn episode needs one idea more than a single response: when
the policy ends a turn (it emits EOS), the *environment* may append tokens of its own --
a tool's output, a game's reply, a user's next message -- and the episode goes on. Those
tokens are part of the transition, not actions: the policy never chose them, so they
carry no log-prob, no gradient, no KL and no advantage. The reward still comes at the
end (the Zero-Reward Assumption), or per turn as true token rewards
(``docs/theory.md#multi-turn``).

A task becomes multi-turn by giving :class:`~llm_mdp.tasks.Task` a ``reply_fn``. After
every turn the policy ends with EOS, ``reply_fn(turn)`` receives the conversation so far
as a :class:`Turn` and returns one of

- ``None``: the episode ends here (``terminated``; the reward is scored);
- a sequence of token ids: a deterministic reply, appended as is;
- a sequence of ``(probability, token_ids)`` pairs: a random reply (a *chance node*):
  the env samples one outcome, the exact toolkit enumerates all of them.

Replies must be functions of the :class:`Turn` (prompt and tokens so far), never of
hidden state: that is what lets an env restart from any prefix (TRePO's value rollouts)
and lets the exact toolkit enumerate the tree. :func:`replay_turns` recovers which tokens
of a response the environment injected by replaying ``reply_fn`` along it; the env, the
agents and the exact toolkit all use it.

This module is the one source for the reply protocol: :func:`normalize_reply` checks
what a ``reply_fn`` returned, :func:`reply_after` asks for the reply to a finished turn
(the turn cap included), :func:`replay_turns` walks a response.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from transformers import PreTrainedTokenizerBase

__all__ = [
    "ReplyFn",
    "ReplyOutcomes",
    "Turn",
    "TurnError",
    "TurnState",
    "describe_turns",
    "normalize_reply",
    "replay_turns",
    "reply_after",
    "turn_segments",
]

ReplyOutcomes = tuple[tuple[float, tuple[int, ...]], ...]
"""A normalised reply: ``((p_1, ids_1), ..., (p_k, ids_k))``, probabilities summing to 1,
each ``ids_i`` non-empty and distinct."""

ReplyFn = Callable[["Turn"], Any]
"""``reply_fn(turn) -> None | Sequence[int] | Sequence[tuple[float, Sequence[int]]]``."""

_PROB_TOL = 1e-6


class TurnError(ValueError):
    """A ``reply_fn`` returned something that is not a reply, or a response does not
    follow the task's replies."""


@dataclass(frozen=True)
class Turn:
    """The conversation so far, handed to ``reply_fn`` when the policy ends a turn.

    Attributes:
        prompt_index: index of the prompt in ``task.prompts`` (-1 for free text).
        prompt_ids: the prompt's token ids, without padding.
        response_ids: every response token so far -- the policy's and the environment's
            -- ending with the EOS that ended this turn.
        policy_mask: one bool per ``response_ids`` entry, True where the policy chose
            the token, False where the environment injected it.
        turn: how many turns the policy has finished (1 after its first EOS).
        tokenizer: the task's tokenizer (to decode the turn or encode a reply).
    """

    prompt_index: int
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    policy_mask: tuple[bool, ...]
    turn: int
    tokenizer: PreTrainedTokenizerBase

    @cached_property
    def prompt(self) -> str:
        """The prompt text (special tokens removed)."""
        return self._decode(self.prompt_ids)

    @cached_property
    def segments(self) -> list[tuple[str, str]]:
        """The response split into turns: ``[("policy", text), ("env", text), ...]``
        (special tokens such as EOS removed)."""
        return turn_segments(
            self.tokenizer, self.response_ids, self.policy_mask, skip_special_tokens=True
        )

    @cached_property
    def last_turn(self) -> str:
        """Text of the policy's turn that just ended (EOS removed)."""
        for who, text in reversed(self.segments):
            if who == "policy":
                return text
        return ""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` under the task's tokenizer (no special tokens added):
        the usual way to build a reply."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


def turn_segments(
    tokenizer: PreTrainedTokenizerBase,
    ids: Sequence[int],
    policy_mask: Sequence[bool | int],
    *,
    skip_special_tokens: bool = False,
) -> list[tuple[str, str]]:
    """``[("policy", text), ("env", text), ...]``: a response split where ``policy_mask``
    changes. With special tokens kept (the default), EOS shows where the policy ended a
    turn."""
    out: list[tuple[str, str]] = []
    start = 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or bool(policy_mask[k]) != bool(policy_mask[start]):
            who = "policy" if policy_mask[start] else "env"
            text = tokenizer.decode(list(ids[start:k]), skip_special_tokens=skip_special_tokens)
            out.append((who, str(text)))
            start = k
    return out


def describe_turns(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], policy_mask: Sequence[bool | int]
) -> str:
    """One line, turn by turn: ``policy: 'ab<eos>' | env: 'c' | policy: ...`` (special
    tokens kept, so EOS marks where the policy ended a turn; ``''`` when empty)."""
    segs = turn_segments(tokenizer, ids, policy_mask)
    return " | ".join(f"{who}: {text!r}" for who, text in segs) or "''"


def normalize_reply(out: Any, *, where: str = "reply_fn") -> ReplyOutcomes | None:
    """Check what a ``reply_fn`` returned and bring it to :data:`ReplyOutcomes` form.

    Raises:
        TurnError: not ``None``, not a non-empty list of ints, not a list of
            ``(probability, ids)`` pairs with non-negative probabilities summing to 1 and
            distinct non-empty ``ids``. The message names the offending value.
    """
    if out is None:
        return None
    if isinstance(out, str | bytes):
        raise TurnError(
            f"{where} returned the string {out!r}; expected token ids (use turn.encode(text))"
        )
    try:
        items = list(out)
    except TypeError:
        raise TurnError(
            f"{where} returned {out!r} of type {type(out).__name__}; expected None, token "
            "ids, or (probability, token_ids) pairs"
        ) from None
    if not items:
        raise TurnError(f"{where} returned an empty reply; return None to end the episode")
    if all(_is_int(x) for x in items):
        return ((1.0, tuple(int(x) for x in items)),)
    outcomes: list[tuple[float, tuple[int, ...]]] = []
    for k, item in enumerate(items):
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise TurnError(
                f"{where} returned outcome #{k} = {item!r}; expected a (probability, "
                "token_ids) pair"
            )
        p, ids = item
        ids_t = tuple(ids) if not isinstance(ids, str | bytes) else ()
        if not ids_t or not all(_is_int(x) for x in ids_t):
            raise TurnError(
                f"{where} returned outcome #{k} with token_ids={ids!r}; expected a non-empty "
                "sequence of ints"
            )
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= float(p) <= 1.0:
            raise TurnError(
                f"{where} returned outcome #{k} with probability {p!r}; expected a number in [0, 1]"
            )
        outcomes.append((float(p), tuple(int(x) for x in ids_t)))
    total = sum(p for p, _ in outcomes)
    if abs(total - 1.0) > _PROB_TOL:
        raise TurnError(f"{where} returned outcome probabilities summing to {total}; expected 1")
    seen = [ids for _, ids in outcomes]
    if len(set(seen)) != len(seen):
        raise TurnError(f"{where} returned the same token_ids in two outcomes: {seen}")
    for i, a in enumerate(seen):
        for b in seen[i + 1 :]:
            if a[: len(b)] == b or b[: len(a)] == a:
                raise TurnError(
                    f"{where} returned outcomes {a} and {b}, one a prefix of the other; "
                    "a response could not tell which one happened"
                )
    return tuple((p, ids) for p, ids in outcomes if p > 0.0)


def _is_int(x: Any) -> bool:
    return not isinstance(x, bool) and (isinstance(x, int) or hasattr(x, "__index__"))


def reply_after(
    reply_fn: ReplyFn,
    *,
    prompt_index: int,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    policy_mask: Sequence[bool],
    turns: int,
    tokenizer: PreTrainedTokenizerBase,
    max_turns: int | None = None,
) -> ReplyOutcomes | None:
    """The environment's reply to the turn that ``response_ids`` ends (with the policy's EOS).

    ``turns`` counts the turns finished, this one included. Returns ``None`` when the
    episode ends (the turn cap ``max_turns`` is reached or ``reply_fn`` says so), else
    the checked outcomes (:func:`normalize_reply`): what :func:`replay_turns` follows
    along a response, and what the exact toolkit branches on at a chance node.
    """
    if max_turns is not None and turns >= max_turns:
        return None
    turn = Turn(
        prompt_index=prompt_index,
        prompt_ids=tuple(int(x) for x in prompt_ids),
        response_ids=tuple(int(x) for x in response_ids),
        policy_mask=tuple(bool(x) for x in policy_mask),
        turn=turns,
        tokenizer=tokenizer,
    )
    return normalize_reply(reply_fn(turn))


@dataclass(frozen=True)
class TurnState:
    """Where a response stands in the turn structure (the result of :func:`replay_turns`).

    Attributes:
        policy_mask: one bool per token of the response, True on the policy's tokens.
        turns: how many turns the policy has finished (EOS tokens it emitted).
        probability: product of the probabilities of the environment's outcomes along
            the response (1.0 when every reply was deterministic).
        pending: token ids the environment still owes: the rest of a reply the response
            stops inside (empty at a decision state).
        ended: True when ``reply_fn`` ended the episode or the turn cap was reached
            after the last token.
        undecided: the random outcomes the response stops among: it ends inside a
            random reply before its tokens tell which outcome happened (right after the
            EOS, say, when the length cap cut it there). The response then stands at a
            chance node, not at a decision state; ``pending`` is empty and
            ``probability`` leaves this last draw out. Empty otherwise.
    """

    policy_mask: tuple[bool, ...]
    turns: int
    probability: float
    pending: tuple[int, ...]
    ended: bool
    undecided: ReplyOutcomes = ()


def replay_turns(
    reply_fn: ReplyFn,
    *,
    prompt_index: int,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    eos_token_id: int,
    tokenizer: PreTrainedTokenizerBase,
    max_turns: int | None = None,
) -> TurnState:
    """Walk ``response_ids`` and say which tokens the environment injected.

    Every policy EOS ends a turn; ``reply_fn`` then gives the reply, which must follow
    in ``response_ids`` (for a random reply: one of its outcomes). A response may stop
    inside a reply (``pending`` is then the rest of it; ``undecided`` lists the outcomes
    when its tokens do not yet tell which one happened) or at a decision state.

    Raises:
        TurnError: the response goes on after the episode ended, or the tokens after an
            EOS are not (a prefix of) any outcome of the reply.
    """
    ids = [int(x) for x in response_ids]
    mask: list[bool] = []
    turns = 0
    prob = 1.0
    i = 0
    while i < len(ids):
        tok = ids[i]
        mask.append(True)
        i += 1
        if tok != eos_token_id:
            continue
        turns += 1
        outcomes = reply_after(
            reply_fn,
            prompt_index=prompt_index,
            prompt_ids=prompt_ids,
            response_ids=ids[:i],
            policy_mask=mask,
            turns=turns,
            tokenizer=tokenizer,
            max_turns=max_turns,
        )
        if outcomes is None:
            if i < len(ids):
                raise TurnError(
                    f"response {ids} goes on after the episode ended at token {i - 1} "
                    f"(turn {turns})"
                )
            return TurnState(tuple(mask), turns, prob, (), True)
        rest = tuple(ids[i:])
        match = [(p, o) for p, o in outcomes if o[: len(rest)] == rest[: len(o)]]
        if len(match) > 1:  # stops at a chance node whose draw the tokens do not show
            mask.extend([False] * len(rest))
            return TurnState(tuple(mask), turns, prob, (), False, tuple(match))
        if not match:
            raise TurnError(
                f"response {ids}: after the EOS at token {i - 1} the tokens {list(rest)} "
                f"are none of the environment's replies {[list(o) for _, o in outcomes]}"
            )
        p, reply = match[0]
        taken = min(len(reply), len(rest))
        mask.extend([False] * taken)
        i += taken
        if taken < len(reply):
            return TurnState(tuple(mask), turns, prob * p, reply[taken:], False)
        prob *= p
    return TurnState(tuple(mask), turns, prob, (), False)
