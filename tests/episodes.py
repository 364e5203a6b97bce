"""Walk multi-turn episodes by hand, the way the env does, for the task tests.

A *policy* here returns the tokens of its next turn (ending with EOS) given the prompt
index and the response so far; :func:`walk` appends them one by one under the length
cap, calls the task's ``reply_fn`` after each EOS (sampling a random reply with ``rng``),
stops on ``None``, the turn cap or the length cap, and scores the response with
``task.score``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llm_mdp.tasks import ResponseBatch, Task, Turn, normalize_reply

Policy = Callable[[int, list[int], list[bool]], list[int]]


@dataclass
class Episode:
    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    policy_mask: list[bool]
    reward: float

    def text(self, task: Task) -> str:
        return str(task.tokenizer.decode(self.response_ids, skip_special_tokens=False))


def prompt_ids(task: Task, index: int) -> list[int]:
    return list(task.tokenizer.encode(task.prompts[index], add_special_tokens=False))


def batch(task: Task, rows: list[tuple[int, list[int], list[bool] | None]]) -> ResponseBatch:
    """A ``ResponseBatch`` of ``(prompt_index, response_ids, policy_mask)`` rows; a row's
    mask ``None`` leaves the whole batch's ``policy_mask`` unset (the task replays)."""
    pad = int(task.tokenizer.pad_token_id)
    prompts = [prompt_ids(task, i) for i, _, _ in rows]
    P = max(len(p) for p in prompts)
    R = max(max(len(r) for _, r, _ in rows), 1)
    p_ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    p_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    r_ids = torch.tensor([r + [pad] * (R - len(r)) for _, r, _ in rows])
    r_mask = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for _, r, _ in rows])
    masks = [m for _, _, m in rows]
    policy_mask = None
    if all(m is not None for m in masks):
        policy_mask = torch.tensor([[int(x) for x in m] + [0] * (R - len(m)) for m in masks])  # type: ignore[union-attr]
    return ResponseBatch(
        p_ids,
        p_mask,
        r_ids,
        r_mask,
        torch.tensor([i for i, _, _ in rows]),
        task.tokenizer,
        policy_mask,
    )


def walk(task: Task, index: int, policy: Policy, rng: random.Random | None = None) -> Episode:
    rng = rng or random.Random(0)
    eos = int(task.tokenizer.eos_token_id)
    prompt = prompt_ids(task, index)
    ids: list[int] = []
    mask: list[bool] = []
    turns = 0
    cap = task.max_response_tokens
    done = False
    while not done and len(ids) < cap:
        for tok in policy(index, list(ids), list(mask)):
            ids.append(int(tok))
            mask.append(True)
            if tok == eos or len(ids) >= cap:
                break
        if ids[-1] != eos or len(ids) >= cap:
            break
        turns += 1
        if task.max_turns is not None and turns >= task.max_turns:
            break
        assert task.reply_fn is not None
        turn = Turn(index, tuple(prompt), tuple(ids), tuple(mask), turns, task.tokenizer)
        outcomes = normalize_reply(task.reply_fn(turn))
        if outcomes is None:
            done = True
            break
        u, acc = rng.random(), 0.0
        reply = outcomes[-1][1]
        for p, o in outcomes:
            acc += p
            if u < acc:
                reply = o
                break
        take = list(reply)[: cap - len(ids)]
        ids += take
        mask += [False] * len(take)
    reward = float(task.score(batch(task, [(index, ids, mask)]))[0])
    return Episode(index, prompt, ids, mask, reward)


def text_policy(task: Task, fn: Callable[[int, str], str]) -> Policy:
    """A policy from ``fn(prompt_index, conversation_text) -> next turn's text``."""
    eos = int(task.tokenizer.eos_token_id)

    def policy(index: int, ids: list[int], mask: list[bool]) -> list[int]:
        text = str(task.tokenizer.decode(ids, skip_special_tokens=True))
        return [*task.tokenizer.encode(fn(index, text), add_special_tokens=False), eos]

    return policy


def uniform_policy(task: Task, rng: random.Random) -> Policy:
    """Every token uniform over the legal actions (EOS included), until EOS."""
    actions = task.action_mask.nonzero().flatten().tolist()
    eos = int(task.tokenizer.eos_token_id)

    def policy(index: int, ids: list[int], mask: list[bool]) -> list[int]:
        out: list[int] = []
        while not out or out[-1] != eos:
            out.append(rng.choice(actions))
            if len(out) > task.max_response_tokens:
                break
        return out

    return policy
