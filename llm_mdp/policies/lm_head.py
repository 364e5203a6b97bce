"""Chunked LM head + log-softmax: token log-probs without a dense ``(N, V)`` logits tensor.

At a 50k vocabulary the logits of a training batch dominate peak memory: one float32
copy of ``(B, R, V)`` is 196 MiB at ``B = 64, R = 16``, and the dense path keeps several
(logits, log-softmax, their gradients). :class:`ChunkedTokenLogProbs` computes, for each
real response token, ``log softmax(h W^T + b)[target]`` (and optionally the entropy)
``rows`` tokens at a time, keeps only ``(N,)`` vectors and the inputs for backward, and
recomputes each chunk's logits in backward. Peak extra memory is one chunk of logits
and its gradient; gradients equal the dense path's up to float round-off.

All functions here are pure; :class:`~llm_mdp.policies.CausalLMPolicy` uses them when the
dense logits would be large (see ``CausalLMPolicy(chunked_head=...)``).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import token_log_probs

__all__ = [
    "CHUNK_ELEMENTS",
    "ChunkedTokenLogProbs",
    "chunked_token_log_probs",
    "head_token_log_probs",
]

CHUNK_ELEMENTS = 6 << 20
"""Logits per chunk (rows x vocabulary): 24 MiB in float32, 125 rows at a 50k vocabulary.
Much smaller chunks make the head's matmuls skinny and slow (a GRPO update at vocab 50257
took 1.11-1.19x the dense head's time with 41-row chunks, 0.95-1.00x with these); larger
ones raise the peak by their size (``benchmarks/README.md``, ``benchmarks/lm_head.py``)."""


def _chunk_logits(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    illegal: torch.Tensor | None,
) -> torch.Tensor:
    """``(n, V)`` tempered logits of one chunk, float32 (float64 for float64 models)."""
    z = h @ weight.t()
    if bias is not None:
        z = z + bias
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    if temperature != 1.0:
        z = z / temperature
    if illegal is not None:
        z = z.masked_fill(illegal, float("-inf"))
    return z


class ChunkedTokenLogProbs(torch.autograd.Function):
    """``(log p[target], entropy)`` per row of ``hidden`` under ``softmax((h W^T + b) / T)``.

    Forward and backward run over chunks of ``rows`` rows; backward recomputes the
    chunk's logits, so nothing of size ``(N, V)`` is kept between them. Gradients flow to
    ``hidden``, ``weight`` and ``bias``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        illegal: torch.Tensor | None,
        rows: int,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        out_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        logp = hidden.new_empty(n, dtype=out_dtype)
        lse = hidden.new_empty(n, dtype=out_dtype)
        entropy = hidden.new_zeros(n, dtype=out_dtype)
        for lo in range(0, n, rows):
            z = _chunk_logits(hidden[lo : lo + rows], weight, bias, temperature, illegal)
            picked = z.gather(1, targets[lo : lo + rows, None]).squeeze(1)
            if with_entropy:
                c_lse = torch.logsumexp(z, dim=-1)
                p = torch.exp(z - c_lse[:, None])
                # H = lse - sum_j p_j z_j; a -inf logit has p = 0 and adds 0
                pz = torch.where(p > 0, p * z, 0.0).sum(-1)
                entropy[lo : lo + rows] = c_lse - pz
            else:  # logsumexp in place on the chunk: one (rows, V) buffer, not two
                top = z.amax(-1, keepdim=True)  # finite: every row has a legal action
                c_lse = z.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(1))
            lse[lo : lo + rows] = c_lse
            logp[lo : lo + rows] = picked - c_lse
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy, illegal)
        ctx.temperature, ctx.rows, ctx.with_entropy = temperature, rows, with_entropy
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, g_logp: torch.Tensor, g_entropy: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, bias, targets, lse, entropy, illegal = ctx.saved_tensors
        T, rows = ctx.temperature, ctx.rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        for lo in range(0, hidden.shape[0], rows):
            h = hidden[lo : lo + rows]
            z = _chunk_logits(h, weight, bias, T, illegal)
            g = g_logp[lo : lo + rows, None]
            if ctx.with_entropy:
                logp_all = z - lse[lo : lo + rows, None]
                p = torch.exp(logp_all)
                # d H / d z_j = -p_j (log p_j + H), 0 where p_j = 0 (a -inf logit)
                ent = entropy[lo : lo + rows, None]
                dz = torch.where(p > 0, p * (logp_all + ent), 0.0)
                dz.mul_(-g_entropy[lo : lo + rows, None]).sub_(p * g)
            else:  # in place on the chunk's logits: p = exp(z - lse), dz = -g p
                dz = z.sub_(lse[lo : lo + rows, None]).exp_().mul_(-g)
            # d log p[t] / d z = onehot(t) - p
            dz.scatter_add_(1, targets[lo : lo + rows, None], g)
            if T != 1.0:
                dz.div_(T)
            dz = dz.to(weight.dtype)
            if grad_h is not None:
                grad_h[lo : lo + rows] = dz @ weight
            if grad_w is not None and grad_w.dtype == h.dtype:
                grad_w.addmm_(dz.t(), h)
            elif grad_w is not None:
                grad_w += (dz.t() @ h).to(acc)
            if grad_b is not None:
                grad_b += dz.sum(0).to(acc)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def chunked_token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    resp_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    illegal: torch.Tensor | None = None,
    with_entropy: bool = False,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked token log-probs (and entropy) from the LM's last hidden states.

    Only the ``N`` real response tokens go through the head (padding costs nothing).

    Args:
        hidden: ``(B, R, H)`` last hidden states at the positions that predict the
            response (after the trunk's final norm).
        weight: ``(V, H)`` LM-head weight (rows beyond the action space already cut).
        bias: ``(V,)`` LM-head bias or ``None``.
        targets: ``(B, R)`` token ids (any value where ``resp_mask`` is 0).
        resp_mask: ``(B, R)``, 1 on real response tokens.
        temperature: > 0; log-probs are of ``softmax(logits / temperature)``.
        illegal: ``(V,)`` bool, tokens whose logit is ``-inf`` (never an action).
        with_entropy: also return the entropy of each position's distribution.
        chunk_elements: logits per chunk (rows x ``V``; default :data:`CHUNK_ELEMENTS`).

    Returns:
        ``(B, R)`` log-probs, 0 on padding, and the ``(B, R)`` entropy (0 on padding) or
        ``None``. Float32 (float64 for float64 models).
    """
    B, R = resp_mask.shape
    keep = resp_mask.bool()
    flat = keep.reshape(-1).nonzero().squeeze(1)  # (N,) one host sync, like the mask sum
    h = hidden.reshape(B * R, -1).index_select(0, flat)
    tgt = targets.reshape(-1).index_select(0, flat)
    rows = max(1, (chunk_elements or CHUNK_ELEMENTS) // weight.shape[0])
    logp_n, ent_n = ChunkedTokenLogProbs.apply(
        h, weight, bias, tgt, float(temperature), illegal, rows, with_entropy
    )
    logp = logp_n.new_zeros(B * R).index_copy(0, flat, logp_n).view(B, R)
    if not with_entropy:
        return logp, None
    return logp, ent_n.new_zeros(B * R).index_copy(0, flat, ent_n).view(B, R)


def head_token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    resp_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    illegal: torch.Tensor | None = None,
    with_entropy: bool = False,
    chunked: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`chunked_token_log_probs`, or (``chunked=False``) the same numbers from dense
    ``(B, R, V)`` logits ``hidden @ weight.T + bias`` (kept for backward). Same arguments
    and returns as :func:`chunked_token_log_probs`."""
    if chunked:
        return chunked_token_log_probs(
            hidden,
            weight,
            bias,
            targets,
            resp_mask,
            temperature=temperature,
            illegal=illegal,
            with_entropy=with_entropy,
        )
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if illegal is not None:
        logits = logits.masked_fill(illegal, float("-inf"))
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return token_log_probs(logits, targets, resp_mask, with_entropy)
