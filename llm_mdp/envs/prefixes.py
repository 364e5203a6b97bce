"""Response prefixes at reset: start rows of the vector env from any non-terminal state
(``reset(options={"response_prefix": ...})``); a multi-turn task's prefixes go through
:mod:`llm_mdp.envs.turns`, which replays the environment's replies."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llm_mdp.envs.turns import write_multi_turn_prefixes

if TYPE_CHECKING:
    from llm_mdp.envs.vector_env import LLMTokenVectorEnv

__all__ = ["write_prefixes"]


def write_prefixes(env: LLMTokenVectorEnv, rows: torch.Tensor, prefix: Any) -> None:
    """Start ``rows`` of ``env`` from the ``response_prefix`` reset option: one list of
    token ids per row, each a non-terminal state (shorter than ``R``, legal non-EOS
    actions; a multi-turn task's replies are checked and completed by
    :func:`~llm_mdp.envs.turns.write_multi_turn_prefixes`).

    Raises:
        ValueError, TypeError: a prefix that is not such a list; the message names the row.
    """
    if isinstance(prefix, str | bytes) or len(prefix) != rows.numel():
        raise ValueError(
            f"response_prefix must hold one list of token ids per reset row "
            f"({rows.numel()}), got {prefix!r:.80}"
        )
    lists = []
    for i, raw in zip(rows.tolist(), prefix, strict=True):
        arr = np.asarray(raw.cpu() if isinstance(raw, torch.Tensor) else raw)
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise TypeError(
                f"response_prefix of row {i} is {raw!r:.80}; expected a list of integer token ids"
            )
        p = arr.astype(np.int64).tolist()
        if len(p) >= env.R:
            raise ValueError(
                f"response_prefix of row {i} has {len(p)} tokens; a non-terminal state "
                f"has fewer than max_response_tokens={env.R}"
            )
        lists.append(p)
    if env.task.multi_turn:
        write_multi_turn_prefixes(env, rows.tolist(), lists)
        return
    # one batched check and write (per-token Python work here would cost more than
    # the rollout on small models: TRePO resets hundreds of prefixes per update)
    lengths = [len(p) for p in lists]
    width = max(lengths, default=0)
    if width:
        block = torch.tensor([p + [env.pad_token_id] * (width - len(p)) for p in lists])
        filled = torch.arange(width) < torch.tensor(lengths).unsqueeze(1)
        inside = (block >= 0) & (block < env.vocab_size)
        legal = env.action_mask.cpu()[block.clamp(0, env.vocab_size - 1)] & inside
        bad = filled & (~legal | (block == env.eos_token_id))
        if bool(bad.any()):
            r, c = (int(x) for x in bad.nonzero()[0])
            t = int(block[r, c])
            name = env._token_name(t) if 0 <= t < env.vocab_size else "not a token"
            raise ValueError(
                f"response_prefix of row {rows.tolist()[r]} contains token {t} ({name}); "
                f"expected legal non-EOS actions in [0, {env.vocab_size})"
            )
        cols = slice(env.P, env.P + width)
        env.ids[rows, cols] = torch.where(filled, block, env.pad_token_id).to(env.device)
        env.mask[rows, cols] = filled.long().to(env.device)
        env.policy_flags[rows, cols] = filled.long().to(env.device)
        env.response_len[rows] = torch.tensor(lengths, device=env.device)
