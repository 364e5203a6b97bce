"""Multi-turn episodes in the vector env: the environment's replies inside ``step``.

When the policy ends a turn with EOS and the task is multi-turn (``Task.reply_fn``), the
env asks the task for its reply (:mod:`llm_mdp.tasks.turns`, the one source of the
protocol) and appends the reply tokens *in the same step*: they are part of the
transition ``s_t, EOS -> s_{t+1}``, not actions. The observation's ``policy_mask`` marks
the tokens the policy chose (1) apart from prompt, padding and injected tokens (0), so
log-probs, KL, advantages and aggregation count only the policy's tokens
(``docs/theory.md#multi-turn``).

The episode ends when the reply is ``None`` (``terminated``), at the ``max_turns``-th EOS
(``terminated``), or at the length cap ``R``, which counts the policy's and the
environment's tokens: a reply that does not fit is cut there and the cap's semantics
apply (``length_cap``). An EOS that fills the last slot ends the episode as an EOS does.

Random replies draw their outcome from one uniform per turn: counter-based when the
reset gave ``reply_streams`` (the agents' rollouts do, so a row's episode depends only on
its stream), else from the env's own seeded generator.

This module holds the per-row Python work (the replies are Python callables anyway); it
runs only for multi-turn tasks, so single-turn steps pay nothing for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from llm_mdp.tasks.turns import ReplyOutcomes, TurnError, reply_after

if TYPE_CHECKING:
    from llm_mdp.envs.vector_env import LLMTokenVectorEnv

__all__ = ["answer_turns", "choose_outcome", "multi_turn_prefixes", "write_multi_turn_prefixes"]


def choose_outcome(outcomes: ReplyOutcomes, u: float) -> tuple[int, ...]:
    """The outcome a uniform ``u`` in ``[0, 1)`` picks (inverse CDF in the listed order)."""
    acc = 0.0
    for p, ids in outcomes:
        acc += p
        if u < acc:
            return ids
    return outcomes[-1][1]  # round-off: the probabilities sum to 1 within 1e-6


def _reply_uniforms(env: LLMTokenVectorEnv, rows: list[int], cols: list[int]) -> list[float]:
    """One uniform per answering row: ``counter_uniforms(reply_stream, EOS column)`` when
    the row was reset with a reply stream, else a draw of the env's generator."""
    streams = env.reply_streams
    out: list[float] = []
    if streams is not None:
        from llm_mdp.agents.streams import counter_uniforms  # agents import the env

        idx = torch.tensor(rows, device=streams.device)
        has = env.has_reply_stream[idx]
        u = counter_uniforms(streams[idx], torch.tensor(cols, device=streams.device))
        drawn = u.tolist()
        own = has.tolist()
    else:
        drawn, own = [0.0] * len(rows), [False] * len(rows)
    for d, o in zip(drawn, own, strict=True):
        out.append(d if o else float(env.np_random.random()))
    return out


def answer_turns(env: LLMTokenVectorEnv, at_eos: torch.Tensor) -> torch.Tensor:
    """Answer every row that just emitted EOS; returns ``(B,)`` bool, the rows whose EOS
    ended the episode (reply ``None``, turn cap, or no room left for a reply).

    Rows that get a reply have its tokens appended (``policy_mask`` 0), cut at the length
    cap; ``step`` then ends them at the cap. Called after the EOS has been written.

    Raises:
        TurnError: ``reply_fn`` returned something that is not a reply, or a token id
            outside the vocabulary (the message names the task, the row and the value).
    """
    task = env.task
    assert task.reply_fn is not None
    ended = at_eos.clone()
    rows = env._rows[at_eos].tolist()
    if not rows:
        return ended
    env.turns[at_eos] += 1
    P, R = env.P, env.R
    idx = torch.tensor(rows, device=env.device)
    lengths = env.response_len[idx].tolist()
    turns = env.turns[idx].tolist()
    ids = env.ids[idx].tolist()
    mask = env.mask[idx].tolist()
    flags = env.policy_flags[idx].tolist()
    pindex = env.prompt_index[idx].tolist()
    replies: list[tuple[int, ReplyOutcomes]] = []
    for k, n in enumerate(lengths):
        if n >= R:  # the EOS filled the last slot: no room for a reply
            continue
        try:
            out = reply_after(
                task.reply_fn,
                prompt_index=pindex[k],
                prompt_ids=[t for t, m in zip(ids[k][:P], mask[k][:P], strict=True) if m],
                response_ids=ids[k][P : P + n],
                policy_mask=flags[k][P : P + n],
                turns=turns[k],
                tokenizer=env.tokenizer,
                max_turns=task.max_turns,
            )
        except TurnError as exc:
            raise TurnError(f"task {task.name!r}, row {rows[k]}: {exc}") from exc
        if out is not None:
            replies.append((k, out))
    if not replies:
        return ended
    us = _reply_uniforms(env, [rows[k] for k, _ in replies], [lengths[k] - 1 for k, _ in replies])
    for (k, outcomes), u in zip(replies, us, strict=True):
        reply = choose_outcome(outcomes, u)
        bad = [t for t in reply if not 0 <= t < env.vocab_size]
        if bad:
            raise TurnError(
                f"task {task.name!r}: reply_fn replied token {bad[0]} to row {rows[k]}; "
                f"expected ids in [0, {env.vocab_size})"
            )
        n = lengths[k]
        fit = reply[: R - n]  # a reply that does not fit is cut at the cap
        i, lo = rows[k], P + n
        cols = slice(lo, lo + len(fit))
        env.ids[i, cols] = torch.tensor(fit, dtype=torch.long, device=env.device)
        env.mask[i, cols] = 1
        env.response_len[i] += len(fit)
        ended[i] = False
    return ended


def multi_turn_prefixes(
    env: LLMTokenVectorEnv, rows: Sequence[int], prefixes: Sequence[list[int]]
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Check response prefixes of a multi-turn task and complete them to decision states.

    A prefix may hold the environment's replies (recovered with ``task.replay``) and
    policy EOS tokens that ended a turn. A prefix that stops inside a reply is completed
    with the rest of that reply (it is determined once the prefix tells which outcome
    happened): the start state is the decision state after it.

    Returns:
        ``(prefixes, policy_masks, turns)`` per row, the prefixes completed.

    Raises:
        ValueError: a prefix does not follow the task's replies, has ended, would reach
            the length cap once completed, or has a policy token that is not a legal
            action (out of the vocabulary, or a special token other than EOS).
    """
    task = env.task
    legal = env.action_mask.cpu()
    out_ids, out_mask, out_turns = [], [], []
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=env.device)
    prompt_rows = env.prompt_index[idx].tolist()
    prompt_block = env.ids[idx, : env.P].cpu()
    prompt_mask = env.mask[idx, : env.P].cpu()
    for j, (i, p) in enumerate(zip(rows, prefixes, strict=True)):
        prompt = prompt_block[j][prompt_mask[j].bool()].tolist()
        try:
            state = task.replay(prompt_rows[j], prompt, p)
        except TurnError as exc:
            raise ValueError(f"response_prefix of row {i}: {exc}") from exc
        if state.ended:
            raise ValueError(
                f"response_prefix of row {i} ends the episode (turn {state.turns}); a start "
                "state must be non-terminal"
            )
        if state.undecided:
            raise ValueError(
                f"response_prefix of row {i} stops inside the environment's random reply "
                f"before its tokens tell which of {[list(o) for _, o in state.undecided]} "
                "happened; a start state must be a decision state"
            )
        full = list(p) + list(state.pending)
        pmask = [int(x) for x in state.policy_mask] + [0] * len(state.pending)
        if len(full) >= env.R:
            raise ValueError(
                f"response_prefix of row {i} has {len(full)} tokens (the environment's "
                f"pending reply included); a non-terminal state has fewer than "
                f"max_response_tokens={env.R}"
            )
        for t, own in zip(full, pmask, strict=True):
            if not 0 <= t < env.vocab_size:
                raise ValueError(
                    f"response_prefix of row {i} contains token {t} (not a token); expected "
                    f"ids in [0, {env.vocab_size})"
                )
            if own and not bool(legal[t]):
                raise ValueError(
                    f"response_prefix of row {i} contains token {t} ({env._token_name(t)}) "
                    "chosen by the policy; expected legal actions"
                )
        out_ids.append(full)
        out_mask.append(pmask)
        out_turns.append(state.turns)
    return out_ids, out_mask, out_turns


def write_multi_turn_prefixes(
    env: LLMTokenVectorEnv, rows: Sequence[int], prefixes: Sequence[list[int]]
) -> None:
    """Start ``rows`` of ``env`` from ``prefixes`` (checked and completed by
    :func:`multi_turn_prefixes`): their tokens, policy flags, lengths and turn counts."""
    ids, flags, turns = multi_turn_prefixes(env, rows, prefixes)
    for i, p, f, t in zip(rows, ids, flags, turns, strict=True):
        cols = slice(env.P, env.P + len(p))
        env.ids[i, cols] = torch.tensor(p, dtype=torch.long, device=env.device)
        env.mask[i, cols] = 1
        env.policy_flags[i, cols] = torch.tensor(f, dtype=torch.long, device=env.device)
        env.response_len[i] = len(p)
        env.turns[i] = t
