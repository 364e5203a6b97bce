"""Compute accounting: how many token positions the agent's models ran forward.

Generated tokens (every action any rollout took) are counted by the envs
(``LLMTokenVectorEnv.tokens_generated``); this module counts the other cost axis, model
forward-token positions: every position any transformer trunk of the agent (the policy,
its reference copy, PPO's critic) ran through, whether a rollout prefill, a one-token
decode step, a training ``log_probs`` pass or a critic pass. Padding counts (it is
computed); a backward pass is not counted separately.

The count is taken by a forward pre-hook on each *trunk* (the innermost
``transformers.PreTrainedModel`` of a module tree), so a model called as a whole or
through its trunk alone is counted once either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def trunks(module: nn.Module) -> list[nn.Module]:
    """The innermost ``transformers.PreTrainedModel`` modules of ``module``'s tree (for a
    causal LM its trunk, e.g. ``GPT2Model``); empty for models that are not transformers."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return []
    models = [m for m in module.modules() if isinstance(m, PreTrainedModel)]
    return [m for m in models if not any(c is not m and c in models for c in m.modules())]


class ForwardPositions:
    """A running count of forward-token positions through the trunks of some modules.

    Args:
        modules: module trees to watch (each trunk is hooked once, however many trees
            hold it).

    Attributes:
        count: positions counted so far (``B * T`` of each trunk call's ``input_ids`` or
            ``inputs_embeds``).
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self.count = 0
        self._handles: list[Any] = []
        seen: set[int] = set()
        for tree in modules:
            for trunk in trunks(tree):
                if id(trunk) not in seen:
                    seen.add(id(trunk))
                    self._handles.append(
                        trunk.register_forward_pre_hook(self._hook, with_kwargs=True)
                    )

    @property
    def watching(self) -> int:
        """Number of trunks hooked (0: the models are not transformers, nothing counts)."""
        return len(self._handles)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            self.count += ids.numel()  # shapes only: no host sync
            return
        embeds = kwargs.get("inputs_embeds")
        if isinstance(embeds, torch.Tensor):
            self.count += embeds.shape[:-1].numel()

    def __getstate__(self) -> dict[str, Any]:
        # a deep copy of the agent copies the hooked modules, whose hooks then call the
        # copy of this counter; the handles (weak references) stay with the original
        return {**self.__dict__, "_handles": []}

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
