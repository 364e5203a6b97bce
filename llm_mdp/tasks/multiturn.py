"""Built-in multi-turn tasks: the environment answers every finished turn.

Both tasks follow the reply protocol of :mod:`llm_mdp.tasks.turns`: after each policy EOS
the environment appends tokens that are not actions (``docs/theory.md#multi-turn``), and
the response-level reward comes at the end (arXiv 2506.02553 eq. (4)).

================  =====================================================  ==================
name              the environment replies                                optimum
================  =====================================================  ==================
``guess_number``  ``<`` / ``>`` to a wrong guess, ends on the right one  binary search, exact
``calculator``    the value of ``[expr]``; a turn without tags answers   1.0
================  =====================================================  ==================

Replies are functions of the conversation (prompt index and tokens), never of hidden
state, so an env can restart from any prefix and the exact toolkit can enumerate the
tree. Reward functions and reply functions are small module-level callables, so the
tasks pickle like the single-turn built-ins.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch

from llm_mdp.tasks.base import ResponseBatch, Task
from llm_mdp.tasks.builtin import _match
from llm_mdp.tasks.tokenizers import char_tokenizer
from llm_mdp.tasks.turns import ReplyFn, Turn, replay_turns

__all__ = [
    "CalculatorReply",
    "CalculatorReward",
    "GuessNumberReply",
    "GuessNumberReward",
    "calculator_task",
    "evaluate_expression",
    "guess_number_optimum",
    "guess_number_random_reward",
    "guess_number_task",
    "policy_turns",
    "response_policy_mask",
]

GUESS_PROMPT = "?"
LOWER, HIGHER, INVALID = "<", ">", "!"


def policy_turns(
    response_ids: Sequence[int], policy_mask: Sequence[bool], eos_token_id: int
) -> list[list[int]]:
    """The policy's finished turns in a response, each without its EOS.

    A turn is a run of policy tokens ending with EOS; a trailing run without EOS (the
    length cap cut it) is not a finished turn and is left out.
    """
    turns: list[list[int]] = []
    current: list[int] = []
    for tok, mine in zip(response_ids, policy_mask, strict=True):
        if not mine:
            continue
        if int(tok) == eos_token_id:
            turns.append(current)
            current = []
        else:
            current.append(int(tok))
    return turns


# ---------------------------------------------------------------------------------------
# guess_number


def guess_number_task(
    num_values: int = 8, max_turns: int | None = None, max_response_tokens: int | None = None
) -> Task:
    """Find a hidden number in ``0..num_values-1``; the env answers ``<`` or ``>``.

    Every prompt reads ``"?"``: prompt ``i`` of the pool hides the number ``i``, so the
    policy sees nothing of it and must ask. A turn's guess is the last digit it writes
    (a turn without a digit is answered ``!``); the env replies ``<`` when the hidden
    number is lower, ``>`` when higher, and ends the episode on a right guess or at the
    ``max_turns``-th turn (default: ``floor(log2 num_values) + 1``, what binary search
    needs). Reward: ``1 - (t - 1) / max_turns`` for a right guess at turn ``t``, else 0.

    The optimum is binary search (:func:`guess_number_optimum`; ``19/32`` for 8 values
    and 4 turns); :func:`guess_number_random_reward` is the uniform policy's reward.
    """
    if not 2 <= num_values <= 10:
        raise ValueError(f"num_values={num_values}, expected 2..10 (one digit per guess)")
    turns = max_turns if max_turns is not None else num_values.bit_length()
    if turns < 1:
        raise ValueError(f"max_turns={max_turns}, expected >= 1")
    digits = "0123456789"[:num_values]
    tok = char_tokenizer(digits + LOWER + HIGHER + INVALID + GUESS_PROMPT)
    # a guess, its EOS and the one-token reply per turn; the last turn gets no reply
    length = max_response_tokens if max_response_tokens is not None else 3 * turns - 1
    return Task(
        name="guess_number",
        prompts=[GUESS_PROMPT] * num_values,
        reward_fn=GuessNumberReward(turns),
        tokenizer=tok,
        max_response_tokens=length,
        optimal_reward=guess_number_optimum(num_values, turns),
        random_reward=guess_number_random_reward(num_values, turns, length, len(tok)),
        description=f"find a hidden number in 0..{num_values - 1}; replies '<' / '>'",
        reply_fn=GuessNumberReply(),
        max_turns=turns,
    )


def _last_digit(text: str) -> int | None:
    digits = [c for c in text if c.isdigit()]
    return int(digits[-1]) if digits else None


def _secret(prompt_index: int) -> int:
    if prompt_index < 0:
        raise ValueError(
            "guess_number hides the number in the prompt's index in the pool; a free-text "
            "prompt (prompt_index=-1) has none: reset with prompt_indices instead"
        )
    return prompt_index


@dataclass(frozen=True)
class GuessNumberReply:
    """``reply_fn`` of ``guess_number``: ``<`` / ``>`` / ``!``, or ``None`` on the number."""

    def __call__(self, turn: Turn) -> list[int] | None:
        """The env's reply to the turn that just ended."""
        secret = _secret(turn.prompt_index)
        guess = _last_digit(turn.last_turn)
        if guess == secret:
            return None
        reply = INVALID if guess is None else (LOWER if secret < guess else HIGHER)
        return turn.encode(reply)


@dataclass(frozen=True)
class GuessNumberReward:
    """``RM(W)`` of ``guess_number``: ``1 - (t - 1) / max_turns`` for a right guess at turn
    ``t``, 0 when the number was not found."""

    max_turns: int

    def __call__(self, batch: ResponseBatch) -> list[float]:
        """One reward per response of ``batch``."""
        tok = batch.tokenizer
        eos = int(tok.eos_token_id)
        prompts = batch.prompt_indices.tolist()
        out = []
        for i, ids in enumerate(batch.response_token_lists()):
            mask = response_policy_mask(batch, i, ids, GuessNumberReply(), self.max_turns)
            turns = policy_turns(ids, mask, eos)
            solved = bool(turns) and _last_digit(str(tok.decode(turns[-1]))) == _secret(prompts[i])
            out.append(1.0 - (len(turns) - 1) / self.max_turns if solved else 0.0)
        return out


def response_policy_mask(
    batch: ResponseBatch, i: int, ids: Sequence[int], reply_fn: ReplyFn, max_turns: int | None
) -> list[bool]:
    """Row ``i``'s policy mask, one bool per token of its response ``ids`` (no padding):
    the batch's when the env gave one, else found by replaying ``reply_fn`` along it."""
    if batch.policy_mask is not None:
        return [bool(m) for m in batch.policy_mask[i, : len(ids)].tolist()]
    prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
    state = replay_turns(
        reply_fn,
        prompt_index=int(batch.prompt_indices[i]),
        prompt_ids=prompt,
        response_ids=ids,
        eos_token_id=int(batch.tokenizer.eos_token_id),
        tokenizer=batch.tokenizer,
        max_turns=max_turns,
    )
    return list(state.policy_mask)


def guess_number_optimum(num_values: int, max_turns: int) -> float:
    """The optimal expected reward of ``guess_number`` (hidden number uniform).

    Let ``g(n, m)`` be the best total, over ``n`` candidates and ``m`` turns left, of the
    turns left when each is found (the turn that finds it included). A guess solves one
    candidate now (worth ``m``) and leaves the ``a`` below it and the ``n - 1 - a`` above
    it with ``m - 1`` turns:
    ``g(n, m) = max_a m + g(a, m - 1) + g(n - 1 - a, m - 1)``, ``g(0, .) = g(., 0) = 0``.
    The reward ``1 - (t - 1) / M`` of a right guess at turn ``t`` is ``(M - t + 1) / M``,
    so the optimum is ``g(K, M) / (K M)``. A guess outside the candidates tells nothing,
    and any turn's guess is one digit, so this search over intervals is the whole game.
    """

    @cache
    def g(n: int, m: int) -> int:
        if n == 0 or m == 0:
            return 0
        return max(m + g(a, m - 1) + g(n - 1 - a, m - 1) for a in range(n))

    return g(num_values, max_turns) / (num_values * max_turns)


def guess_number_random_reward(
    num_values: int, max_turns: int, max_response_tokens: int, vocab_size: int
) -> float:
    """Expected reward of the uniform policy (every token, EOS included, ``1/V``).

    Exact, by dynamic programming over (tokens used, turns done, the current turn's last
    digit: none / the hidden number / another). Only whether the last digit is the hidden
    number matters, so the value is the same for every hidden number. A turn that ends
    with a wrong guess is answered with one token; the length cap ``R`` counts replies,
    and an episode cut by it scores 0.
    """
    V, K, M, R = vocab_size, num_values, max_turns, max_response_tokens
    p_eos, p_hit, p_miss = 1 / V, 1 / V, (K - 1) / V
    p_other = 1.0 - p_eos - p_hit - p_miss
    # mass[(t, c)] at the current position; c: 0 no digit yet, 1 hit, 2 miss
    mass: list[dict[tuple[int, int], float]] = [dict() for _ in range(R + 2)]
    mass[0][(0, 0)] = 1.0
    total = 0.0
    for n in range(R):
        for (t, c), p in mass[n].items():
            if c == 1:
                total += p * p_eos * (1.0 - t / M)  # the turn t + 1 ends on the number
            elif t + 1 < M and n + 2 <= R:
                key = (t + 1, 0)
                mass[n + 2][key] = mass[n + 2].get(key, 0.0) + p * p_eos
            for c2, q in ((1, p_hit), (2, p_miss), (c, p_other)):
                mass[n + 1][(t, c2)] = mass[n + 1].get((t, c2), 0.0) + p * q
    return total


# ---------------------------------------------------------------------------------------
# calculator

CALC_ALPHABET = "0123456789+*=[]?"
_EXPR = re.compile(r"\d+([+*]\d+)*")


def calculator_task(
    digits_a: int = 2,
    digits_b: int = 1,
    max_turns: int = 3,
    partial: bool = False,
    max_response_tokens: int | None = None,
) -> Task:
    """Answer ``"37*8="`` with ``"296"``, with a calculator the env runs.

    A turn written between tags, ``[37*8]`` then EOS, is a tool call: the env appends
    the value of the expression (``296``; ``?`` when it is not ``digits`` joined by
    ``+`` / ``*``) and the episode goes on. The first turn without tags is the answer
    and ends the episode (so does the ``max_turns``-th turn). Reward: 1 if the answer is
    ``a * b`` in digits (per-character credit with ``partial=True``), else 0; optimum 1.0.

    Prompts: every ``a * b`` with ``a`` of ``digits_a`` digits (no leading zero) and ``b``
    of ``digits_b`` digits from 2 up: with the defaults 720 products, more than a small
    model memorises, while calling the tool and copying its reply works on all of them.
    Default length cap: a call, its reply and the answer of the longest product.
    """
    if not (1 <= digits_a <= 3 and 1 <= digits_b <= 3):
        raise ValueError(f"digits_a={digits_a}, digits_b={digits_b}; expected 1..3 each")
    if max_turns < 1:
        raise ValueError(f"max_turns={max_turns}, expected >= 1")
    lo_a = 10 ** (digits_a - 1) if digits_a > 1 else 2
    lo_b = 10 ** (digits_b - 1) if digits_b > 1 else 2
    pairs = [(a, b) for a in range(lo_a, 10**digits_a) for b in range(lo_b, 10**digits_b)]
    prompts = [f"{a}*{b}=" for a, b in pairs]
    answer = len(str((10**digits_a - 1) * (10**digits_b - 1)))
    length = digits_a + digits_b + 5 + 2 * answer  # "[a*b]" EOS, reply, answer EOS
    return Task(
        name="calculator",
        prompts=prompts,
        reward_fn=CalculatorReward(partial, max_turns),
        tokenizer=char_tokenizer(CALC_ALPHABET),
        max_response_tokens=max_response_tokens if max_response_tokens is not None else length,
        optimal_reward=1.0,
        description="multiply a*b; a turn [expr] calls a calculator that appends its value",
        reply_fn=CalculatorReply(),
        max_turns=max_turns,
    )


def evaluate_expression(text: str) -> int | None:
    """Value of ``digits`` joined by ``+`` and ``*`` (usual precedence); None otherwise.

    >>> evaluate_expression("2+3*4"), evaluate_expression("3*"), evaluate_expression("")
    (14, None, None)
    """
    if not _EXPR.fullmatch(text):
        return None
    return sum(_product(term) for term in text.split("+"))


def _product(term: str) -> int:
    out = 1
    for factor in term.split("*"):
        out *= int(factor)
    return out


def _tool_call(text: str) -> str | None:
    """The expression of a tool call ``[expr]``, or None when the turn is an answer."""
    return text[1:-1] if len(text) >= 2 and text[0] == "[" and text[-1] == "]" else None


@dataclass(frozen=True)
class CalculatorReply:
    """``reply_fn`` of ``calculator``: a tool call's value (``?`` if not an expression),
    ``None`` after an answer."""

    def __call__(self, turn: Turn) -> list[int] | None:
        """The env's reply to the turn that just ended."""
        expr = _tool_call(turn.last_turn)
        if expr is None:
            return None
        value = evaluate_expression(expr)
        return turn.encode("?" if value is None else str(value))


@dataclass(frozen=True)
class CalculatorReward:
    """``RM(W)`` of ``calculator``: is the policy's answer turn ``a * b`` for ``a*b=``?"""

    partial: bool = False
    max_turns: int | None = None

    def __call__(self, batch: ResponseBatch) -> torch.Tensor:
        """``(n,)`` float64 rewards of ``batch``."""
        tok = batch.tokenizer
        eos = int(tok.eos_token_id)
        out = torch.zeros(len(batch), dtype=torch.float64)
        for i, ids in enumerate(batch.response_token_lists()):
            mask = response_policy_mask(batch, i, ids, CalculatorReply(), self.max_turns)
            turns = [str(tok.decode(t)) for t in policy_turns(ids, mask, eos)]
            if not turns or _tool_call(turns[-1]) is not None:
                continue  # no answer: cut by the length cap or the turn cap
            a, b = batch.prompts[i].rstrip("=").split("*")
            out[i] = _match(turns[-1], str(int(a) * int(b)), self.partial)
        return out
