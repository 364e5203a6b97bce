"""Tiny random causal LMs built from a config: offline, deterministic given ``seed``.

They are real ``transformers`` models (GPT-2 and Llama architectures), so everything
tested with them runs unchanged on pretrained checkpoints. Dropout is off so a model in
``train()`` mode computes the same function as in ``eval()`` mode, which the exact tests
and the KV-cache equivalence checks rely on.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

__all__ = ["tiny_gpt2", "tiny_llama"]


def _special_ids(
    pad_token_id: int | None, eos_token_id: int | None, bos_token_id: int | None, vocab_size: int
) -> dict[str, Any]:
    ids: dict[str, Any] = {
        "pad_token_id": pad_token_id,
        "eos_token_id": eos_token_id,
        "bos_token_id": bos_token_id,
    }
    for name, value in ids.items():
        if value is not None and not 0 <= value < vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {vocab_size})")
    return ids


def tiny_gpt2(
    vocab_size: int,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    max_positions: int = 256,
    seed: int = 0,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    tie_word_embeddings: bool = True,
    init_std: float = 0.02,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 (learned absolute positions, tied embeddings by default).

    Args:
        vocab_size: embedding rows = LM-head size = action space of the env.
        n_layer, n_embd, n_head: transformer size (``n_embd % n_head == 0``).
        max_positions: longest sequence (prompt + response) the model accepts.
        seed: initialisation seed; the global RNG is left untouched.
        pad_token_id, eos_token_id, bos_token_id: written into the config when given.
        tie_word_embeddings: share input embedding and LM head (GPT-2's own choice).
        init_std: std of the normal init; larger values give peakier random policies.

    Returns:
        ``GPT2LMHeadModel`` in eval mode, float32, on CPU.
    """
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=init_std,
        tie_word_embeddings=tie_word_embeddings,
        **_special_ids(pad_token_id, eos_token_id, bos_token_id, vocab_size),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()


def tiny_llama(
    vocab_size: int,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_kv_head: int | None = 2,
    intermediate_size: int | None = None,
    max_positions: int = 256,
    seed: int = 0,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    tie_word_embeddings: bool = False,
    init_std: float = 0.02,
) -> LlamaForCausalLM:
    """A randomly initialised Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention).

    Args:
        vocab_size: embedding rows = LM-head size.
        n_layer, n_embd, n_head: transformer size (``n_embd % n_head == 0``).
        n_kv_head: key/value heads (GQA); ``None`` means ``n_head`` (plain MHA).
        intermediate_size: MLP width; default ``2 * n_embd``.
        max_positions: longest sequence the model is meant for (RoPE has no hard cap).
        seed: initialisation seed; the global RNG is left untouched.
        pad_token_id, eos_token_id, bos_token_id: written into the config when given.
        tie_word_embeddings: share input embedding and LM head. Off by default, like the
            Llama family's own config, so the untied path gets exercised too.
        init_std: std of the normal init.

    Returns:
        ``LlamaForCausalLM`` in eval mode, float32, on CPU.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=n_embd,
        intermediate_size=intermediate_size or 2 * n_embd,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_kv_head or n_head,
        max_position_embeddings=max_positions,
        attention_dropout=0.0,
        initializer_range=init_std,
        tie_word_embeddings=tie_word_embeddings,
        **_special_ids(pad_token_id, eos_token_id, bos_token_id, vocab_size),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
