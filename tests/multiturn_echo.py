"""A small multi-turn task with a known optimum, shared by the multi-turn tests.

"echo": the policy ends its first turn with EOS; the environment answers with a random
hint token, ``c`` or ``d`` with probability 1/2 each (a chance node, injected, not an
action); the policy's second turn must start with the hint. Reward 1 when it does, else
0; the episode ends at the second EOS (``max_turns=2``) or at the length cap. Optimum:
1.0 (EOS at once, then copy the hint); a uniformly random policy scores about 0.3.
"""

from __future__ import annotations

import torch

from llm_mdp.tasks import ResponseBatch, Task, Turn, char_tokenizer


def echo_task(max_response_tokens: int = 6) -> Task:
    tok = char_tokenizer("cd")
    c, d = tok.convert_tokens_to_ids(["c", "d"])
    eos = int(tok.eos_token_id)

    def reply(turn: Turn) -> list[tuple[float, list[int]]] | None:
        return [(0.5, [c]), (0.5, [d])] if turn.turn == 1 else None

    def reward(batch: ResponseBatch) -> list[float]:
        assert batch.policy_mask is not None
        out = []
        for ids, pm in zip(batch.response_token_lists(), batch.policy_mask.tolist(), strict=True):
            first_eos = ids.index(eos) if eos in ids else len(ids)
            hint = first_eos + 1  # the injected token right after turn 1
            ok = hint + 1 < len(ids) and pm[hint] == 0 and ids[hint + 1] == ids[hint]
            out.append(float(ok))
        return out

    return Task(
        "echo",
        ["c"],
        reward,
        tok,
        max_response_tokens=max_response_tokens,
        reply_fn=reply,
        max_turns=2,
        optimal_reward=1.0,
    )


def ids_of(task: Task, text: str) -> list[int]:
    return list(task.tokenizer.convert_tokens_to_ids(list(text)))


def as_long(x: list[int]) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.long)
