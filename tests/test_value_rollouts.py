"""TRePO's value rollouts: forking a prefix's KV cache and batching change cost, not results.

Counter-based streams make every episode's draws a function of its own key, so

* a forked rollout (one prefill per start state, KV cache repeated ``K`` ways) samples
  exactly the tokens of a plain rollout (checked in float64, where both forwards agree
  to round-off far below any sampling threshold);
* ``rollout_prefixes`` gives each episode the reward of running it alone;
* TRePO's prefix values do not depend on ``value_batch_size`` (float32, 1e-5).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from llm_mdp.agents import TRePO
from llm_mdp.agents.rollout import EnvPool, rollout, rollout_prefixes
from llm_mdp.agents.streams import stream_ids
from llm_mdp.agents.trepo import TRePOConfig
from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.policies import CausalLMPolicy, tiny_gpt2, tiny_llama
from llm_mdp.tasks import make_task


def _setup(num_envs: int, dtype: torch.dtype = torch.float32):
    task = make_task("reverse", partial=True)
    env = LLMTokenVectorEnv(task, num_envs, info_text=False)
    model = tiny_gpt2(
        env.vocab_size,
        seed=5,
        init_std=0.3,
        pad_token_id=env.pad_token_id,
        eos_token_id=env.eos_token_id,
    ).to(dtype)
    return env, CausalLMPolicy(model, env.tokenizer, seed=0)


def _prefixes(env: LLMTokenVectorEnv, n: int) -> list[list[int]]:
    """``n`` ragged response prefixes of non-EOS tokens (empty ones included)."""
    g = torch.Generator().manual_seed(1)
    legal = [t for t in range(env.vocab_size) if t not in (env.eos_token_id, env.pad_token_id)]
    out = []
    for j in range(n):
        length = j % 4
        out.append([legal[int(i)] for i in torch.randint(len(legal), (length,), generator=g)])
    return out


def test_forked_rollout_samples_the_same_tokens_float64():
    K, n = 3, 4
    env, policy = _setup(n * K, torch.float64)
    prefixes = _prefixes(env, n)
    options = {
        "prompt_indices": [0, 5, 9, 2],
        "group_size": K,
        "response_prefix": [p for p in prefixes for _ in range(K)],
    }
    streams = stream_ids(7, 0, 1, rows=torch.arange(n * K))
    encoded = []  # rows of every full prefill
    prefill = policy._prefill

    def spy(ids, mask):
        encoded.append(ids.shape[0])
        return prefill(ids, mask)

    policy._prefill = spy  # type: ignore[method-assign]
    plain = rollout(env, policy, options, streams=streams)
    assert encoded == [n * K]
    forked = rollout(env, policy, options, streams=streams, fork=K)
    assert encoded == [n * K, n]  # each start state encoded once, then forked
    assert torch.equal(forked.input_ids, plain.input_ids)
    assert torch.equal(forked.attention_mask, plain.attention_mask)
    torch.testing.assert_close(forked.sample_logp, plain.sample_logp, atol=1e-10, rtol=0)
    torch.testing.assert_close(forked.rewards, plain.rewards, atol=0, rtol=0)
    # the K copies of one start state drew different continuations (their own streams)
    resp = plain.input_ids[:, env.P :].view(n, K, -1)
    assert any(not torch.equal(resp[j, 0], resp[j, 1]) for j in range(n))
    with pytest.raises(ValueError, match="runs of 2 equal rows"):
        rollout(
            env,
            policy,
            {**options, "group_size": 1, "prompt_indices": list(range(12))},
            streams=streams,
            fork=2,
        )


def test_rollout_prefixes_equals_one_episode_at_a_time():
    K = 2
    env, policy = _setup(4)
    prompts, prefixes = [3, 3, 7, 11, 1], _prefixes(env, 5)
    streams = stream_ids(3, 2, 1, rows=torch.arange(len(prompts) * K))
    batched = rollout_prefixes(
        EnvPool(env), policy, prompts, prefixes, copies=K, streams=streams, batch_size=4
    )
    assert batched.shape == (5, K)
    single = EnvPool(env).get(1)
    for j, (p, pre) in enumerate(zip(prompts, prefixes, strict=True)):
        for k in range(K):
            options = {"prompt_indices": [p], "response_prefix": [pre]}
            ro = rollout(single, policy, options, streams=streams[j * K + k : j * K + k + 1])
            assert float(ro.rewards[0]) == pytest.approx(float(batched[j, k]), abs=1e-6)


def test_trepo_values_do_not_depend_on_value_batching():
    values = []
    for value_batch_size in (None, 6):
        env, policy = _setup(8)
        cfg = TRePOConfig(seed=4, value_batch_size=value_batch_size, num_anchors=2)
        agent = TRePO(env, policy, cfg)
        batch = agent.collect()
        assert batch.value_rollouts > 6  # several batches at value_batch_size=6
        values.append(batch.prefix_values)
    torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=0)


def _resume_setup(factory, dtype: torch.dtype, K: int):
    """A main rollout that keeps its policy state, and start states cut from its rows."""
    task = make_task("reverse", partial=True)
    env = LLMTokenVectorEnv(task, 8, info_text=False)
    model = factory(
        env.vocab_size, seed=5, pad_token_id=env.pad_token_id, eos_token_id=env.eos_token_id
    ).to(dtype)
    policy = CausalLMPolicy(model, env.tokenizer, seed=0)
    options = {"prompt_indices": [4, 17, 30, 51], "group_size": 2}
    main = rollout(
        env, policy, options, streams=stream_ids(1, 0, 0, rows=torch.arange(8)), keep_state=True
    )
    assert main.policy_state is not None
    lengths = main.response_mask.sum(-1).tolist()
    resp, prompts = main.response_ids.tolist(), main.prompt_indices.tolist()
    rows = [i for i in range(8) for c in range(lengths[i])]  # every non-terminal state
    cuts = [c for i in range(8) for c in range(lengths[i])]
    starts = {
        "prompt_indices": [prompts[i] for i in rows],
        "group_size": K,
        "response_prefix": [resp[i][:c] for i, c in zip(rows, cuts, strict=True) for _ in range(K)],
    }
    value_env = EnvPool(env).get(len(rows) * K)
    streams = stream_ids(9, 0, 1, rows=torch.arange(len(rows) * K))
    return policy, main, value_env, starts, streams, torch.tensor(rows)


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_resumed_rollout_samples_the_same_tokens_float64(factory):
    """Value rollouts that start from the main rollout's KV cache (no prefix encoded) draw
    exactly the tokens of ones that encode their prefixes (absolute and rotary positions)."""
    K = 2
    policy, main, env, starts, streams, rows = _resume_setup(factory, torch.float64, K)
    assert rows.numel() >= 8 and min(len(p) for p in starts["response_prefix"]) == 0
    before = policy.positions_encoded
    fresh = rollout(env, policy, starts, streams=streams, fork=K)
    encoded = policy.positions_encoded - before
    assert encoded > 0
    before = policy.positions_encoded
    resumed = rollout(
        env, policy, starts, streams=streams, fork=K, resume=(main.policy_state, rows)
    )
    assert policy.positions_encoded == before  # nothing re-encoded
    assert torch.equal(resumed.input_ids, fresh.input_ids)
    torch.testing.assert_close(resumed.sample_logp, fresh.sample_logp, atol=1e-10, rtol=0)
    torch.testing.assert_close(resumed.rewards, fresh.rewards, atol=0, rtol=0)
    # the main state is left as it was: resuming twice gives the same episodes again
    again = rollout(env, policy, starts, streams=streams, fork=K, resume=(main.policy_state, rows))
    assert torch.equal(again.input_ids, fresh.input_ids)


def test_prefix_state_refuses_what_is_not_a_prefix():
    policy, main, env, starts, streams, rows = _resume_setup(tiny_gpt2, torch.float32, 1)
    obs, _ = env.reset(options=starts)
    assert policy.prefix_state(main.policy_state, rows, obs) is not None
    shifted = torch.roll(rows, 1)  # start states paired with other rows' histories
    assert policy.prefix_state(main.policy_state, shifted, obs) is None
    # and the rollout then encodes the prefixes instead (same episodes)
    before = policy.positions_encoded
    ro = rollout(env, policy, starts, streams=streams, resume=(main.policy_state, shifted))
    assert policy.positions_encoded > before
    plain = rollout(env, policy, starts, streams=streams)
    assert torch.equal(ro.input_ids, plain.input_ids)
    assert main.select(torch.tensor([0, 1])).policy_state is None


@pytest.mark.parametrize("task", ["reverse", "echo"])
def test_trepo_values_with_and_without_cache_reuse(task):
    """TRePO's value estimates agree (1e-5, float32) whether its value rollouts start from
    the main rollout's KV cache or encode their prefixes; single- and multi-turn."""
    from multiturn_echo import echo_task

    values, encoded = [], []
    for keep in (True, False):
        if task == "echo":
            env = LLMTokenVectorEnv(echo_task(), 8, info_text=False)
            policy = CausalLMPolicy(tiny_gpt2(env.vocab_size, seed=0), env.tokenizer, seed=0)
        else:
            env, policy = _setup(8)
        agent = TRePO(env, policy, TRePOConfig(seed=4, num_anchors=2))
        agent.keep_state = keep
        batch = agent.collect()
        assert batch.policy_state is None  # released after the value rollouts
        values.append(batch.prefix_values)
        encoded.append(policy.positions_encoded)
    torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=0)
    assert encoded[0] < encoded[1]


@pytest.mark.parametrize("greedy", [False, True])
def test_compacted_rollout_samples_the_same_tokens_float64(greedy):
    """Rows that have ended leave the policy's batch (compact=True): the same episodes
    (float64), fewer positions decoded."""
    env, policy = _setup(16, torch.float64)
    options = {"prompt_indices": list(range(0, 64, 4)), "group_size": 1}
    streams = stream_ids(2, 0, 0, rows=torch.arange(16))
    decoded = []
    results = []
    for compact in (False, True):
        before = policy.positions_decoded
        results.append(
            rollout(env, policy, options, streams=streams, greedy=greedy, compact=compact)
        )
        decoded.append(policy.positions_decoded - before)
    plain, compacted = results
    lengths = plain.response_mask.sum(-1)
    assert int(lengths.min()) < int(lengths.max())  # rows end at different steps
    assert torch.equal(compacted.input_ids, plain.input_ids)
    torch.testing.assert_close(compacted.sample_logp, plain.sample_logp, atol=1e-10, rtol=0)
    torch.testing.assert_close(compacted.rewards, plain.rewards, atol=0, rtol=0)
    assert decoded[1] < decoded[0] if not greedy else decoded[1] <= decoded[0]
