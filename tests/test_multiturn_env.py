"""Multi-turn episodes in the env: replies inside ``step``, the policy mask, caps, prefixes,
checkers, the SB3 adapter, and the policy's KV cache across injected tokens."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from multiturn_echo import echo_task, ids_of

from llm_mdp.agents.rollout import rollout, stream_ids
from llm_mdp.envs import LLMTokenEnv, LLMTokenVectorEnv
from llm_mdp.policies import CausalLMPolicy, tiny_gpt2, tiny_llama
from llm_mdp.tasks import ResponseBatch, Task, Turn, TurnError, char_tokenizer


def _tool_task(reply_len: int = 3, max_response_tokens: int = 10, **kw: Any) -> Task:
    """Deterministic: every turn is answered with ``reply_len`` copies of 'b'; the reward
    counts the policy's 'a' tokens and checks it saw the env's tokens in ``policy_mask``."""
    tok = char_tokenizer("ab")
    a, b = tok.convert_tokens_to_ids(["a", "b"])

    def reply(turn: Turn) -> list[int]:
        return [b] * reply_len

    def reward(batch: ResponseBatch) -> torch.Tensor:
        assert batch.policy_mask is not None
        own = (batch.response_ids == a) & batch.policy_mask.bool()
        return own.sum(-1).double()

    return Task("tool", ["a"], reward, tok, max_response_tokens, reply_fn=reply, **kw)


def test_reply_is_appended_in_the_same_step_and_masked() -> None:
    task = _tool_task(max_turns=2)
    env = LLMTokenVectorEnv(task, 2)
    a, b = ids_of(task, "ab")
    eos = env.eos_token_id
    obs, _ = env.reset(seed=0)
    P = env.P
    assert torch.equal(obs["policy_mask"], torch.zeros_like(obs["policy_mask"]))
    obs, r, term, _, _ = env.step(torch.tensor([a, eos]))
    # row 1 ended turn 1: EOS and the reply "bbb" are in this transition
    assert obs["input_ids"][1, P : P + 4].tolist() == [eos, b, b, b]
    assert obs["attention_mask"][1, P:].tolist()[:5] == [1, 1, 1, 1, 0]
    assert obs["policy_mask"][1, P:].tolist()[:5] == [1, 0, 0, 0, 0]
    assert obs["policy_mask"][0, P:].tolist()[:2] == [1, 0]
    assert env.turns.tolist() == [0, 1] and not term.any() and r.abs().sum() == 0
    obs, r, term, _, _ = env.step(torch.tensor([eos, a]))
    obs, r, term, _, _ = env.step(torch.tensor([a, eos]))  # row 1: turn 2 = max_turns
    assert term.tolist() == [False, True]
    assert obs["policy_mask"][1, P:].tolist()[:7] == [1, 0, 0, 0, 1, 1, 0]
    assert r[1] == 1.0  # the policy's one 'a'; the env's 'b's are not the policy's


def test_single_turn_policy_mask_is_the_response_mask() -> None:
    env = LLMTokenVectorEnv("target_token", 3)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        obs, *_ = env.step(torch.tensor([1, 2, env.eos_token_id]))
    P = env.P
    assert torch.equal(obs["policy_mask"][:, P:], obs["attention_mask"][:, P:])
    assert obs["policy_mask"][:, :P].sum() == 0


@pytest.mark.parametrize("length_cap", ["terminated", "truncated"])
def test_a_reply_that_does_not_fit_is_cut_at_the_cap(length_cap: str) -> None:
    task = _tool_task(reply_len=3, max_response_tokens=4)
    env = LLMTokenVectorEnv(task, 1, length_cap=length_cap)  # type: ignore[arg-type]
    a, b = ids_of(task, "ab")
    env.reset(seed=0)
    env.step(torch.tensor([a]))
    obs, r, term, trunc, _ = env.step(torch.tensor([env.eos_token_id]))
    assert obs["input_ids"][0, env.P :].tolist() == [a, env.eos_token_id, b, b]
    assert (bool(term[0]), bool(trunc[0])) == (
        length_cap == "terminated",
        length_cap == "truncated",
    )
    assert r.tolist() == [1.0]


def test_eos_in_the_last_slot_ends_without_asking_for_a_reply() -> None:
    calls: list[int] = []
    tok = char_tokenizer("ab")

    def reply(turn: Turn) -> list[int]:
        calls.append(turn.turn)
        return [1]

    task = Task("t", ["a"], lambda b: [0.0] * len(b), tok, 2, reply_fn=reply)
    env = LLMTokenVectorEnv(task, 1, length_cap="truncated")
    env.reset(seed=0)
    env.step(torch.tensor([1]))
    _, _, term, trunc, _ = env.step(torch.tensor([env.eos_token_id]))
    assert (bool(term[0]), bool(trunc[0]), calls) == (True, False, [])


def test_reply_errors_name_the_task_and_value() -> None:
    tok = char_tokenizer("ab")
    task = Task("bad", ["a"], lambda b: [0.0] * len(b), tok, 4, reply_fn=lambda t: [99])
    env = LLMTokenVectorEnv(task, 1)
    env.reset(seed=0)
    with pytest.raises(TurnError, match=r"'bad'.*token 99"):
        env.step(torch.tensor([env.eos_token_id]))
    task = Task("str", ["a"], lambda b: [0.0] * len(b), tok, 4, reply_fn=lambda t: "b")
    env = LLMTokenVectorEnv(task, 1)
    env.reset(seed=0)
    with pytest.raises(TurnError, match=r"'str'.*string 'b'"):
        env.step(torch.tensor([env.eos_token_id]))


def _play(env: LLMTokenVectorEnv, options: dict[str, Any]) -> list[int]:
    """The hint each row got after an immediate EOS (echo task)."""
    env.reset(options=options)
    obs, *_ = env.step(torch.full((env.num_envs,), env.eos_token_id))
    return obs["input_ids"][:, env.P + 1].tolist()


def test_random_replies_depend_only_on_the_row_stream() -> None:
    task = echo_task()
    c, d = ids_of(task, "cd")
    streams = stream_ids(7, rows=torch.arange(64))
    env = LLMTokenVectorEnv(task, 64)
    opts = {"prompt_indices": [0] * 64, "reply_streams": streams}
    hints = _play(env, opts)
    assert set(hints) == {c, d} and 16 < hints.count(c) < 48
    # other rows, other order, another batch size: the same hint per stream
    env8 = LLMTokenVectorEnv(task, 8)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:8]
    again = _play(env8, {"prompt_indices": [0] * 8, "reply_streams": streams[perm]})
    assert again == [hints[i] for i in perm.tolist()]


def test_env_alone_draws_replies_from_its_seeded_generator() -> None:
    task = echo_task()
    env = LLMTokenVectorEnv(task, 32)
    first = _play(env, {})
    env.reset(seed=3)
    a = _play(env, {})
    env.reset(seed=3)
    assert _play(env, {}) == a
    single = LLMTokenEnv(task)
    seen = []
    for seed in (5, 5, 6, 7, 8, 9):
        single.reset(seed=seed)
        obs, *_ = single.step(single._vec.eos_token_id)
        seen.append(int(obs["input_ids"][single.P + 1]))
    assert seen[0] == seen[1] and len(set(seen)) == 2 and len(set(first)) == 2


def test_response_prefix_with_replies() -> None:
    task = echo_task(max_response_tokens=8)
    env = LLMTokenVectorEnv(task, 3)
    c, d = ids_of(task, "cd")
    eos = env.eos_token_id
    # a finished turn and its reply; a turn in progress; a prefix stopping right after the
    # EOS would be ambiguous (which hint?) and is rejected below
    obs, _ = env.reset(options={"response_prefix": [[c, eos, d], [c, eos, c, d], [c, c]]})
    P = env.P
    assert obs["policy_mask"][:, P : P + 4].tolist() == [[1, 1, 0, 0], [1, 1, 0, 1], [1, 1, 0, 0]]
    assert env.turns.tolist() == [1, 1, 0]
    obs, r, term, *_ = env.step(torch.tensor([d, eos, eos]))
    assert term.tolist() == [False, True, False] and r.tolist() == [0.0, 0.0, 0.0]
    assert obs["input_ids"][2, P + 3].item() in (c, d)  # row 2 got its hint now
    with pytest.raises(ValueError, match="before its tokens"):
        env.reset(options={"response_prefix": [[c, eos], [c], [c]]})
    with pytest.raises(ValueError, match="none of the environment's replies"):
        env.reset(options={"response_prefix": [[c, eos, eos], [c], [c]]})
    with pytest.raises(ValueError, match="ends the episode"):
        env.reset(options={"response_prefix": [[eos, c, c, eos], [c], [c]]})


def test_prefix_stopping_inside_a_reply_is_completed() -> None:
    task = _tool_task(reply_len=3, max_response_tokens=10)
    a, b = ids_of(task, "ab")
    eos = int(task.tokenizer.eos_token_id)
    env = LLMTokenVectorEnv(task, 1)
    obs, _ = env.reset(options={"response_prefix": [[a, eos, b]]})
    P = env.P
    assert obs["input_ids"][0, P : P + 5].tolist() == [a, eos, b, b, b]
    assert obs["policy_mask"][0, P : P + 5].tolist() == [1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="pending reply included"):
        LLMTokenVectorEnv(task, 1, max_response_tokens=5).reset(
            options={"response_prefix": [[a, eos, b]]}
        )


def test_render_shows_the_turns() -> None:
    task = _tool_task(reply_len=1)
    a, _ = ids_of(task, "ab")
    env = LLMTokenEnv(task, render_mode="ansi")
    env.reset(seed=0)
    env.step(a)
    env.step(env._vec.eos_token_id)
    env.step(a)
    text = env.render()
    assert text == "[0] 'a' | policy: 'a<eos>' | env: 'b' | policy: 'a' (running, turn 1)"


def test_token_rewards_over_turns() -> None:
    """Per-turn true token rewards: 1 on each policy EOS; the env's tokens get none."""
    task = _tool_task(reply_len=2, max_turns=3)
    eos = int(task.tokenizer.eos_token_id)

    def token_rewards(batch: ResponseBatch) -> torch.Tensor:
        assert batch.policy_mask is not None
        return ((batch.response_ids == eos) & batch.policy_mask.bool()).double()

    task.token_reward_fn = token_rewards
    task.reward_fn = lambda batch: token_rewards(batch).sum(-1)
    env = LLMTokenVectorEnv(task, 1)
    env.reset(seed=0)
    for _ in range(3):
        *_, info = env.step(torch.tensor([eos]))
    tr = info["token_rewards"][0]
    assert tr[:7].tolist() == [1, 0, 0, 1, 0, 0, 1] and tr.sum() == 3


def test_gymnasium_and_sb3_checkers_pass() -> None:
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = LLMTokenEnv(echo_task())
    check_env(env, skip_render_check=True)
    sb3_check_env(LLMTokenEnv(echo_task()), warn=True)


def test_sb3_adapter_runs_multi_turn_episodes() -> None:
    from llm_mdp.sb3 import LLMVecEnv

    task = echo_task()
    c, d = ids_of(task, "cd")
    venv = LLMVecEnv(task, num_envs=4)
    venv.seed(0)
    obs = venv.reset()
    eos = int(task.tokenizer.eos_token_id)
    P = obs["input_ids"].shape[1] - task.max_response_tokens
    obs, rewards, dones, _ = venv.step(np.full(4, eos))
    hints = obs["input_ids"][:, P + 1]
    assert set(hints.tolist()) <= {c, d} and obs["policy_mask"][:, P + 1].sum() == 0
    obs, rewards, dones, _ = venv.step(hints)
    obs, rewards, dones, infos = venv.step(np.full(4, eos))
    assert dones.all() and rewards.tolist() == [1.0] * 4
    assert all("terminal_observation" in info for info in infos)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_kv_cache_carries_over_injected_tokens(make: Any) -> None:
    """Acting log-probs over multi-turn episodes (replies of 3 tokens inside steps) equal
    a teacher-forced forward, and the cache is never rebuilt: one prefill per episode."""
    task = _tool_task(reply_len=3, max_response_tokens=14, max_turns=3)
    env = LLMTokenVectorEnv(task, 6)
    torch.manual_seed(0)
    model = make(env.vocab_size, seed=1, init_std=0.5).float()
    policy = CausalLMPolicy(model, env.tokenizer, seed=0)
    streams = stream_ids(1, rows=torch.arange(6))
    ro = rollout(env, policy, {"prompt_indices": [0] * 6}, streams=streams)
    assert ro.policy_mask is not None and ro.multi_turn
    injected = (ro.token_mask - ro.policy_mask).sum()
    assert injected >= 6  # several rows had replies
    assert policy.positions_encoded == 6 * env.P  # the first prefill only
    with torch.no_grad():
        forced = policy.log_probs(ro.input_ids, ro.attention_mask, ro.prompt_width)
    mask = ro.response_mask
    assert (ro.sample_logp * (1 - mask)).abs().max() == 0  # no log-prob on env tokens
    assert (forced * mask - ro.sample_logp).abs().max() < 1e-5


def test_multi_turn_episode_depends_only_on_its_stream() -> None:
    """Token draws and random replies both come from the row's stream: the same episodes
    in a batch of 8 and, reordered, in a batch of 4."""
    task = echo_task()
    policy = CausalLMPolicy(tiny_gpt2(3, seed=2, init_std=0.5), task.tokenizer, seed=0)
    streams = stream_ids(11, rows=torch.arange(8))
    big = rollout(LLMTokenVectorEnv(task, 8), policy, {"prompt_indices": [0] * 8}, streams=streams)
    pick = torch.tensor([6, 1, 3, 4])
    small = rollout(
        LLMTokenVectorEnv(task, 4), policy, {"prompt_indices": [0] * 4}, streams=streams[pick]
    )
    L = small.response_ids.shape[1]
    assert torch.equal(big.response_ids[pick, :L], small.response_ids)
    assert torch.equal(big.response_mask[pick, :L], small.response_mask)
    assert torch.allclose(big.sample_logp[pick, :L], small.sample_logp, atol=1e-6)
    assert big.multi_turn and torch.equal(big.rewards[pick], small.rewards)


def test_a_cache_full_of_holes_is_compacted_by_a_prefill() -> None:
    """Replies of different rows widen every row's cache; past the cap ``act`` prefills
    again (compacting it), with the same log-probs."""
    task = _tool_task(reply_len=5, max_response_tokens=24, max_turns=4)
    env = LLMTokenVectorEnv(task, 6)
    policy = CausalLMPolicy(tiny_gpt2(env.vocab_size, seed=1, init_std=0.5), env.tokenizer)
    policy.MAX_CACHE_WIDTH_FACTOR = 1
    ro = rollout(
        env, policy, {"prompt_indices": [0] * 6}, streams=stream_ids(2, rows=torch.arange(6))
    )
    assert policy.positions_encoded > 6 * env.P  # it prefilled again
    with torch.no_grad():
        forced = policy.log_probs(ro.input_ids, ro.attention_mask, ro.prompt_width)
    assert (forced * ro.response_mask - ro.sample_logp).abs().max() < 1e-5
