"""What the policies read from a Hugging Face causal LM: sizes, LM head, trunk, kwargs.

One place for both :class:`~llm_mdp.policies.CausalLMPolicy` and the stable-baselines3
policy (``llm_mdp.sb3.policy``). PEFT wrappers are looked through (``get_base_model``).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

__all__ = [
    "cache_rows",
    "forward_params",
    "hidden_size",
    "lm_head",
    "lm_head_size",
    "logits_to_keep_kw",
    "trunk",
]


def _unwrap(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT


def forward_params(model: Any) -> set[str]:
    """Names of the model's ``forward`` arguments (empty when they cannot be read)."""
    try:
        return set(inspect.signature(_unwrap(model).forward).parameters)
    except (TypeError, ValueError):
        return set()


def logits_to_keep_kw(model: Any) -> str | None:
    """The model's ``logits_to_keep`` argument name (older: ``num_logits_to_keep``)."""
    params = forward_params(model)
    return next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)


def lm_head(model: Any) -> nn.Module | None:
    """The output embedding (LM head) module, or ``None``."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if get is not None else None


def lm_head_size(model: Any) -> int:
    """Rows of the LM head (logits per position); the config's ``vocab_size`` otherwise."""
    weight = getattr(lm_head(model), "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(model.config.vocab_size)


def hidden_size(model: Any) -> int:
    """Width ``H`` of the last hidden state (the LM head's input)."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "hidden_size", None)
    if size is None:
        weight = getattr(lm_head(model), "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"{type(model).__name__}: no hidden_size in the config, no LM head")
        size = weight.shape[1]
    return int(size)


def trunk(model: Any) -> nn.Module | None:
    """The transformer without its LM head (``model.base_model``: ``transformer`` for
    GPT-2, ``model`` for Llama), whose output is the last hidden state; ``None`` when the
    model has no separate one."""
    inner = _unwrap(model)
    prefix = getattr(inner, "base_model_prefix", None)
    base = getattr(inner, prefix, None) if prefix else None
    return base if isinstance(base, nn.Module) and base is not inner else None


def cache_rows(cache: Any, rows: torch.Tensor, columns: torch.Tensor) -> Any:
    """A new KV cache whose row ``j`` holds the entries ``columns[j]`` of row ``rows[j]`` of
    ``cache`` (which is left as it is), or ``None`` when ``cache`` is not a plain
    ``DynamicCache`` of ``DynamicLayer`` s (sliding windows, quantized or static layers keep
    state that such a copy would not carry).

    Args:
        cache: a ``transformers`` cache with keys ``(B, heads, S, head_dim)`` per layer.
        rows: ``(n,)`` source rows.
        columns: ``(n, w)`` source positions along the sequence axis, per new row.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if type(cache) is not DynamicCache or any(type(x) is not DynamicLayer for x in cache.layers):
        return None
    out = copy.copy(cache)
    out.layers = []
    layer: Any
    for layer in cache.layers:
        new = copy.copy(layer)
        keys = layer.keys[rows]
        idx = columns[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        new.keys, new.values = keys.gather(2, idx), layer.values[rows].gather(2, idx)
        out.layers.append(new)
    return out
