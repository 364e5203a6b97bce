"""The CUDA path: the same numbers on a GPU as on the CPU (skipped without one).

CI has no GPU; these run wherever ``torch.cuda.is_available()``, e.g. with
``pytest tests/test_cuda.py`` on a GPU machine. Each test compares a CUDA computation
with the CPU one on the same weights and the same counter-based random streams.
"""

from __future__ import annotations

import copy

import pytest
import torch

from llm_mdp import LLMTokenVectorEnv
from llm_mdp.agents import AGENTS, get_agent, rollout
from llm_mdp.policies import CausalLMPolicy, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _policy(env: LLMTokenVectorEnv, kind: str, device: str) -> CausalLMPolicy:
    factory = tiny_gpt2 if kind == "gpt2" else tiny_llama
    model = factory(env.vocab_size, seed=0, eos_token_id=env.eos_token_id)
    return CausalLMPolicy(model, env.tokenizer, seed=0, device=device)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_kv_cached_acting_equals_teacher_forcing_on_cuda(kind: str) -> None:
    env = LLMTokenVectorEnv("reverse", 16, device="cuda")
    policy = _policy(env, kind, "cuda")
    ro = rollout(env, policy, {"group_size": 4})
    assert ro.input_ids.device.type == "cuda"
    with torch.no_grad():
        teacher = policy.log_probs(ro.input_ids, ro.attention_mask, ro.prompt_width)
    mask = ro.response_mask.bool()
    assert float((teacher - ro.sample_logp)[mask].abs().max()) < 1e-4


def test_counter_based_rollouts_are_the_same_on_cpu_and_cuda() -> None:
    from llm_mdp.agents.streams import stream_ids

    out = {}
    for dev in ("cpu", "cuda"):
        env = LLMTokenVectorEnv("reverse", 16, device=dev)
        policy = _policy(env, "gpt2", dev).double()
        streams = stream_ids(0, 0, rows=torch.arange(16, device=env.device))
        ro = rollout(
            env, policy, {"prompt_indices": list(range(4)), "group_size": 4}, streams=streams
        )
        out[dev] = ro.input_ids.cpu()
    assert torch.equal(out["cpu"], out["cuda"])


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_one_update_of_each_agent_matches_the_cpu(name: str) -> None:
    params = {}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # every module float64 (PPO's critic too)
    try:
        for dev in ("cpu", "cuda"):
            env = LLMTokenVectorEnv("reverse", 32, device=dev, task_kwargs={"partial": True})
            policy = _policy(env, "gpt2", dev)
            cls = get_agent(name)
            agent = cls(env, policy, cls.config_class(seed=0, learning_rate=1e-3))
            (metrics,) = agent.learn(1, progress=False)
            # the last gradient (Adam's first step amplifies float round-off near 0)
            params[dev] = torch.cat([p.grad.cpu().flatten() for p in policy.parameters()])
            assert metrics["grad_norm"] > 0
    finally:
        torch.set_default_dtype(default)
    # float64 models, but the rollout's log-probs (the ratio's denominator) are float32
    # on both devices: the gradients agree to float32 round-off of those (measured on an
    # H200: at most 7.6e-8, for gradients of size 1e-2)
    assert float((params["cpu"] - params["cuda"]).abs().max()) < 2e-7


def test_chunked_head_equals_dense_on_cuda() -> None:
    env = LLMTokenVectorEnv("reverse", 8, device="cuda")
    dense = _policy(env, "llama", "cuda")
    dense_copy = copy.deepcopy(dense)
    chunked = CausalLMPolicy(dense_copy.model, env.tokenizer, seed=0, chunked_head=True)
    dense = CausalLMPolicy(dense.model, env.tokenizer, seed=0, chunked_head=False)
    ro = rollout(env, dense, {"group_size": 2})
    a = dense.log_probs(ro.input_ids, ro.attention_mask, ro.prompt_width)
    b = chunked.log_probs(ro.input_ids, ro.attention_mask, ro.prompt_width)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    a.sum().backward()
    b.sum().backward()
    for p, q in zip(dense.parameters(), chunked.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=0)
