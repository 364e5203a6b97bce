"""Chunked LM head: log-probs, entropy and gradients equal the dense path's.

The chunked path never holds a dense ``(B, R, V)`` tensor; it must still give the same
numbers (float32, 1e-5) on GPT-2 (tied head) and Llama (untied) with ragged lengths,
at a temperature, with and without the entropy in the loss, including the gradient of
every parameter.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy

import pytest
import torch

from llm_mdp.policies import CausalLMPolicy, tiny_gpt2, tiny_llama
from llm_mdp.policies.lm_head import chunked_token_log_probs

VOCAB = 300  # several chunks at the small chunk size used below
P, R = 5, 7
ILLEGAL = [VOCAB - 2, VOCAB - 1]  # not actions: logits -inf in both paths (never targets)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Env layout with ragged prompts (right-aligned) and responses (left-aligned)."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens, resp_lens = [5, 1, 3, 2, 4], [7, 0, 3, 1, 5]
    B = len(prompt_lens)
    ids = torch.zeros((B, P + R), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (p, r) in enumerate(zip(prompt_lens, resp_lens, strict=True)):
        ids[b, P - p : P + r] = torch.randint(1, VOCAB - len(ILLEGAL), (p + r,), generator=g)
        mask[b, P - p : P + r] = 1
    return ids, mask


def _policies(arch: str, temperature: float) -> tuple[CausalLMPolicy, CausalLMPolicy]:
    build = tiny_gpt2 if arch == "gpt2" else tiny_llama
    kwargs = {"tie_word_embeddings": False} if arch == "llama" else {}
    model = build(VOCAB, n_embd=32, n_head=4, seed=1, init_std=0.3, **kwargs)
    dense = CausalLMPolicy(model, temperature=temperature, seed=0, chunked_head=False)
    chunked = CausalLMPolicy(
        copy.deepcopy(model), temperature=temperature, seed=0, chunked_head=True
    )
    legal = torch.ones(VOCAB, dtype=torch.bool)
    legal[ILLEGAL] = False
    dense.set_action_mask(legal)
    chunked.set_action_mask(legal)
    return dense, chunked


def _grads(policy: CausalLMPolicy) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_head_equals_dense(arch, temperature, monkeypatch):
    monkeypatch.setattr("llm_mdp.policies.lm_head.CHUNK_ELEMENTS", VOCAB * 3)
    dense, chunked = _policies(arch, temperature)
    ids, mask = _batch()
    resp = mask[:, P:].bool()
    weights = torch.linspace(-1.0, 2.0, R).expand(ids.shape[0], R)  # any upstream gradient
    out = {}
    for name, pol in (("dense", dense), ("chunked", chunked)):
        pol.zero_grad()
        logp, ent = pol.log_probs_and_entropy(ids, mask, P)
        ((logp * weights).sum() + 0.3 * (ent * weights.flip(1)).sum()).backward()
        out[name] = (logp.detach(), ent.detach(), _grads(pol))
    (lp_d, ent_d, g_d), (lp_c, ent_c, g_c) = out["dense"], out["chunked"]
    assert lp_c.dtype == torch.float32 and lp_c.shape == (ids.shape[0], R)
    assert (lp_c[~resp] == 0).all() and (ent_c[~resp] == 0).all()
    assert (lp_c[resp] < 0).all() and (ent_c[resp] > 0).all()
    torch.testing.assert_close(lp_c, lp_d, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_c, ent_d, atol=1e-5, rtol=0)
    assert g_c.keys() == g_d.keys() and len(g_d) > 0
    for name in g_d:
        torch.testing.assert_close(g_c[name], g_d[name], atol=1e-5, rtol=1e-4, msg=name)
    # without the entropy the same log-probs come back alone
    torch.testing.assert_close(chunked.log_probs(ids, mask, P), lp_d, atol=1e-5, rtol=0)


def test_chunked_head_float64_and_illegal_tokens():
    """Exact in float64; a token masked to -inf has probability 0 and adds nothing to H."""
    torch.manual_seed(0)
    B, V, H = 3, 11, 4
    hidden = torch.randn(B, R, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, dtype=torch.float64, requires_grad=True)
    illegal = torch.zeros(V, dtype=torch.bool)
    illegal[[2, 7]] = True
    targets = torch.randint(0, V, (B, R))
    targets = torch.where(illegal[targets], 4, targets)  # sampled tokens are legal
    resp_mask = torch.ones(B, R, dtype=torch.long)
    resp_mask[1, 4:] = 0
    logp, ent = chunked_token_log_probs(
        hidden,
        weight,
        bias,
        targets,
        resp_mask,
        temperature=1.3,
        illegal=illegal,
        with_entropy=True,
        chunk_elements=2 * V,
    )
    assert ent is not None and logp.dtype == torch.float64
    z = ((hidden @ weight.t() + bias) / 1.3).masked_fill(illegal, float("-inf"))
    ref_all = torch.log_softmax(z, -1)
    keep = resp_mask.bool()
    ref = ref_all.gather(-1, targets[..., None])[..., 0].masked_fill(~keep, 0)
    p = ref_all.exp()
    finite = ref_all.clamp(min=torch.finfo(torch.float64).min)  # 0 * -inf would be nan
    ref_ent = -(p * finite).sum(-1).masked_fill(~keep, 0)
    torch.testing.assert_close(logp, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-12, rtol=0)
    w = torch.randn(B, R, dtype=torch.float64)
    g_mine = torch.autograd.grad((logp * w).sum() + (ent * w.cos()).sum(), (hidden, weight, bias))
    g_ref = torch.autograd.grad((ref * w).sum() + (ref_ent * w.cos()).sum(), (hidden, weight, bias))
    for a, b in zip(g_mine, g_ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(
        lambda h: chunked_token_log_probs(
            h,
            weight.detach(),
            bias.detach(),
            targets,
            resp_mask,
            illegal=illegal,
            with_entropy=True,
            chunk_elements=2 * V,
        ),
        (hidden.detach().requires_grad_(),),
    )


def test_chunked_head_default_threshold(monkeypatch):
    """``chunked_head=None`` chunks only above the size threshold, with equal numbers."""
    model = tiny_gpt2(VOCAB, n_embd=32, n_head=4, seed=2)
    pol = CausalLMPolicy(model, seed=0)
    ids, mask = _batch(1)
    calls = []
    real = chunked_token_log_probs

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("llm_mdp.policies.lm_head.chunked_token_log_probs", spy)
    with torch.no_grad():
        small = pol.log_probs(ids, mask, P)
        assert calls == []
        monkeypatch.setattr(CausalLMPolicy, "CHUNKED_HEAD_MIN_ELEMENTS", 1)
        big = pol.log_probs(ids, mask, P)
    assert calls == [1]
    torch.testing.assert_close(big, small, atol=1e-5, rtol=0)


def test_chunked_head_equals_dense_on_a_cut_head(monkeypatch):
    """``vocab_size`` below the LM head's rows (padded embeddings): the head is sliced, and
    the gradient of the cut rows is zero on both paths."""
    monkeypatch.setattr("llm_mdp.policies.lm_head.CHUNK_ELEMENTS", VOCAB * 3)
    model = tiny_llama(VOCAB, n_embd=32, n_head=4, seed=1, init_std=0.3, tie_word_embeddings=False)
    V = VOCAB - 20
    ids, mask = _batch()
    ids = ids % V
    out = {}
    for chunked in (False, True):
        pol = CausalLMPolicy(copy.deepcopy(model), vocab_size=V, seed=0, chunked_head=chunked)
        logp = pol.log_probs(ids, mask, P)
        (logp * torch.linspace(-1.0, 2.0, R)).sum().backward()
        out[chunked] = (logp.detach(), _grads(pol))
    (lp_d, g_d), (lp_c, g_c) = out[False], out[True]
    torch.testing.assert_close(lp_c, lp_d, atol=1e-5, rtol=0)
    assert g_c.keys() == g_d.keys()
    for name in g_d:
        torch.testing.assert_close(g_c[name], g_d[name], atol=1e-5, rtol=1e-4, msg=name)
    head = "model.lm_head.weight"
    assert g_c[head][V:].abs().max() == 0 and g_c[head][:V].abs().max() > 0
