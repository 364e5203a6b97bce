"""The token MDP: zero rewards until the end, terminal RM(W), layout, resets, errors."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

import llm_mdp.envs  # noqa: F401  (registers the ids)
from llm_mdp.envs import EnvStateError, LLMTokenEnv, LLMTokenVectorEnv, env_id
from llm_mdp.tasks import TASKS, RewardError, Task, char_tokenizer, make_task


def test_episode_zero_rewards_then_terminal_reward() -> None:
    env = LLMTokenEnv("reverse", task_kwargs={"partial": True})
    obs, _ = env.reset(seed=0, options={"prompt": "abc="})
    tok = env.tokenizer
    actions = [*tok("cbd").input_ids, tok.eos_token_id]
    rewards = []
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        rewards.append(r)
    assert rewards[:-1] == [0.0, 0.0, 0.0]
    assert term and not trunc
    assert info["response"] == "cbd" and info["prompt"] == "abc="
    # the final reward is the task's reward of the decoded response
    assert rewards[-1] == pytest.approx(2 / 3)
    batch_reward = env.task.reward_fn  # same function, called on text directly
    assert batch_reward is not None
    ids = obs["input_ids"]
    assert ids[: env.P].tolist()[-4:] == tok("abc=").input_ids
    assert ids[env.P : env.P + 4].tolist() == actions


@pytest.mark.parametrize("task", sorted(TASKS))
def test_gymnasium_checker_and_registration(task: str) -> None:
    env = gym.make(env_id(task))
    check_env(env.unwrapped, skip_render_check=False)
    vec = gym.make_vec(env_id(task), num_envs=3)
    assert isinstance(vec, LLMTokenVectorEnv) and vec.num_envs == 3


def test_length_cap_terminated_or_truncated() -> None:
    for cap, expect in (("terminated", (True, False)), ("truncated", (False, True))):
        env = LLMTokenEnv("target_token", max_response_tokens=3, length_cap=cap)  # type: ignore[arg-type]
        env.reset(seed=0)
        a = env.tokenizer.convert_tokens_to_ids("a")
        for _ in range(2):
            assert env.step(a)[1:4] == (0.0, False, False)
        _, r, term, trunc, _ = env.step(a)
        assert (term, trunc) == expect and r == pytest.approx(3 / 8)  # task normalizes by 8


def test_hidden_rewards_info_and_identity() -> None:
    gamma = 0.9
    env = LLMTokenEnv("hidden_rewards", task_kwargs={"gamma": gamma, "max_response_tokens": 4})
    rng = np.random.default_rng(0)
    for _ in range(20):
        env.reset(seed=int(rng.integers(1 << 30)))
        done, total = False, 0.0
        while not done:
            _, r, term, trunc, info = env.step(int(rng.integers(0, env.action_space.n)))
            total += r
            done = term or trunc
        tr = info["token_rewards"]
        assert total == pytest.approx(sum(gamma**t * x for t, x in enumerate(tr)), abs=1e-12)


def test_vector_env_groups_prefix_and_frozen_rows() -> None:
    env = LLMTokenVectorEnv("target_token", 4, max_response_tokens=4)
    obs, _ = env.reset(
        seed=0,
        options={
            "prompt_indices": [3, 5],
            "group_size": 2,
            "response_prefix": [[], [2], [3, 4], []],
        },
    )
    ids, mask = obs["input_ids"], obs["attention_mask"]
    assert torch.equal(ids[0], ids[1].where(torch.arange(env.W) < env.P, ids[0]))
    assert env.response_len.tolist() == [0, 1, 2, 0]
    assert mask[:, env.P :].sum(1).tolist() == [0, 1, 2, 0]
    eos = env.eos_token_id
    a = env.tokenizer.convert_tokens_to_ids("a")
    _, r, term, _, info = env.step(torch.tensor([eos, a, a, a]))
    assert term.tolist() == [True, False, False, False]
    assert r[0].item() == 0.0 and info["response"][0] == ""
    # a frozen row ignores its action and pays 0; the flags report the step a row ends
    _, r, term, _, _ = env.step(torch.tensor([a, a, a, a]))
    assert term.tolist() == [False, False, True, False] and r[0].item() == 0.0
    assert env.done.tolist() == [True, False, True, False]
    assert r[2].item() == pytest.approx(2 / 8)  # prefix 'bc' + 'aa': 2 hits of 8 slots
    assert env.ids[0, env.P].item() == eos and env.mask[0, env.P + 1].item() == 0
    while not env.all_done:
        env.step(torch.full((4,), a))
    with pytest.raises(EnvStateError, match="every episode ended"):
        env.step(torch.full((4,), a))


def test_reset_is_seeded_and_partial_reset() -> None:
    env = LLMTokenVectorEnv("reverse", 8)
    o1, _ = env.reset(seed=7)
    o2, _ = env.reset(seed=7)
    assert torch.equal(o1["input_ids"], o2["input_ids"])
    mask = np.zeros(8, dtype=bool)
    mask[2] = True
    env.step(torch.full((8,), 2))
    before = env.ids.clone()
    env.reset(options={"reset_mask": mask, "prompts": ["ab="]})
    assert torch.equal(env.ids[:2], before[:2]) and env.response_len.tolist()[2] == 0
    assert env.response_batch(torch.tensor([2])).prompts == ["ab="]


def test_same_step_autoreset_reports_final_obs() -> None:
    env = LLMTokenVectorEnv("target_token", 2, max_response_tokens=2, autoreset_mode="SameStep")
    env.reset(seed=0)
    eos = env.eos_token_id
    obs, r, term, _, info = env.step(torch.tensor([eos, 2]))
    assert term.tolist() == [True, False]
    assert info["_final_obs"].tolist() == [True, False]
    assert info["final_obs"]["attention_mask"][0, env.P].item() == 1
    assert obs["attention_mask"][0, env.P :].sum().item() == 0  # row 0 already restarted
    assert env.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP


def test_next_step_autoreset() -> None:
    env = LLMTokenVectorEnv("target_token", 2, max_response_tokens=2, autoreset_mode="NextStep")
    env.reset(seed=0)
    eos = env.eos_token_id
    _, _, term, _, _ = env.step(torch.tensor([eos, 2]))
    assert term.tolist() == [True, False]
    obs, r, term, trunc, _ = env.step(torch.tensor([3, 2]))  # row 0 restarts, action ignored
    assert term.tolist() == [False, True] and r[0].item() == 0.0
    assert obs["attention_mask"][0, env.P :].sum().item() == 0


def test_numpy_backend_matches_spaces() -> None:
    env = LLMTokenVectorEnv("arithmetic", 5, backend="numpy")
    obs, _ = env.reset(seed=1)
    assert env.observation_space.contains(obs)
    for _ in range(env.R):
        obs, r, term, trunc, _ = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        assert r.dtype == np.float64 and term.dtype == np.bool_
        if term.all():
            break


# ---------------------------------------------------------------------------- bad input
def test_bad_actions_are_rejected_and_env_stays_usable() -> None:
    env = LLMTokenVectorEnv("target_token", 2)
    with pytest.raises(EnvStateError, match="before reset"):
        env.step(torch.tensor([2, 2]))
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action 99 \(row 1\) is outside the vocabulary \[0, 9\)"):
        env.step(torch.tensor([2, 99]))
    with pytest.raises(TypeError, match="integer token ids"):
        env.step(torch.tensor([2.0, 1.0]))
    with pytest.raises(TypeError, match="integer token ids"):
        env.step(np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \(2,\)"):
        env.step(torch.tensor([2, 2, 2]))
    env.step(torch.tensor([2, 3]))  # still usable
    assert env.response_len.tolist() == [1, 1]


def test_single_env_step_after_end() -> None:
    env = LLMTokenEnv("target_token")
    env.reset(seed=0)
    env.step(env.tokenizer.eos_token_id)
    with pytest.raises(EnvStateError, match="after the episode ended"):
        env.step(2)
    with pytest.raises(ValueError, match="single token id"):
        env.reset()
        env.step([2, 3])


def test_prompt_too_long_and_bad_prefix() -> None:
    env = LLMTokenVectorEnv("reverse", 1)
    with pytest.raises(ValueError, match="more than max_prompt_tokens"):
        env.reset(options={"prompts": ["abcdabcd="]})
    with pytest.raises(ValueError, match="cannot tokenize prompt"):
        env.reset(options={"prompts": ["xyz"]})
    with pytest.raises(ValueError, match="contains token 0 \\('<eos>'\\)"):
        env.reset(options={"response_prefix": [[env.eos_token_id]]})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"promt": ["ab="]})
    with pytest.raises(ValueError, match="outside the task's pool"):
        env.reset(options={"prompt_indices": [10_000]})


def _task_with_reward(fn) -> Task:  # type: ignore[no-untyped-def]
    return Task.from_text_fn("bad", ["ab"], fn, char_tokenizer("ab"), max_response_tokens=2)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda p, r: [1.0 / 0.0 for _ in r], "raised ZeroDivisionError.*prompt='ab'"),
        (lambda p, r: [float("nan") for _ in r], "reward #0 is nan"),
        (lambda p, r: [float("inf") for _ in r], "reward #0 is inf"),
        (lambda p, r: ["good" for _ in r], "reward #0 is 'good' of type str"),
        (lambda p, r: [1.0, 2.0, 3.0], "returned 3 value"),
        (lambda p, r: None, "returned NoneType"),
    ],
)
def test_bad_reward_functions(fn, match: str) -> None:  # type: ignore[no-untyped-def]
    env = LLMTokenVectorEnv(_task_with_reward(fn), 1)
    env.reset(seed=0)
    with pytest.raises(RewardError, match=match):
        env.step(torch.tensor([env.eos_token_id]))
    env.reset(seed=0)  # usable after the error
    assert env.response_len.item() == 0


def test_tokenizer_without_eos_or_pad() -> None:
    tok = char_tokenizer("ab")
    tok.eos_token = None
    with pytest.raises(ValueError, match="no eos_token_id"):
        Task.from_text_fn("t", ["a"], lambda p, r: [0.0] * len(r), tok)
    tok = char_tokenizer("ab")
    tok.pad_token = None
    with pytest.raises(ValueError, match="no pad_token_id"):
        Task.from_text_fn("t", ["a"], lambda p, r: [0.0] * len(r), tok)


def test_builtin_task_rewards() -> None:
    from llm_mdp.tasks import ResponseBatch

    def score(task: Task, prompt: str, response: str, eos: bool = True) -> float:
        tok = task.tokenizer
        p = torch.tensor([tok(prompt).input_ids])
        ids = tok(response).input_ids + ([tok.eos_token_id] if eos else [])
        r = torch.tensor([ids])
        batch = ResponseBatch(p, torch.ones_like(p), r, torch.ones_like(r), torch.tensor([-1]), tok)
        return float(task.score(batch)[0])

    assert score(make_task("reverse"), "abc=", "cba") == 1.0
    assert score(make_task("reverse"), "abc=", "cb") == 0.0
    assert score(make_task("reverse", partial=True), "abc=", "cb") == pytest.approx(2 / 3)
    assert score(make_task("arithmetic"), "3+4=", "7") == 1.0
    assert score(make_task("arithmetic"), "3+4=", "8") == 0.0
    assert score(make_task("keyword", keyword="ab"), "c", "cabd") == 1.0
    assert score(make_task("keyword", keyword="ab"), "c", "acbd") == 0.0
    assert score(make_task("target_token"), "c", "aab") == pytest.approx(2 / 8)
    hidden = make_task("hidden_rewards", max_response_tokens=2)
    r = hidden.metadata["token_reward"]
    a, b, eos = (hidden.tokenizer.convert_tokens_to_ids(t) for t in ("a", "b", "<eos>"))
    p = (a,)
    assert score(hidden, "a", "b") == pytest.approx(r(p, (), b) + r(p, (b,), eos))
    # the DP optimum is the best of the 7 responses of a 2-token horizon
    ended = [score(hidden, "a", s) for s in ("", "a", "b")]
    capped = [score(hidden, "a", s, eos=False) for s in ("aa", "ab", "ba", "bb")]
    assert hidden.optimal_reward == pytest.approx(max(ended + capped), abs=1e-12)


def test_unknown_task_name() -> None:
    with pytest.raises(ValueError, match="unknown task 'nope'; known tasks: arithmetic"):
        make_task("nope")
