"""Built-in multi-turn tasks (llm_mdp.tasks.multiturn): guess_number and calculator.

Episodes are walked by hand through the reply protocol (tests/episodes.py), the way
the env plays them; the optimum of guess_number is computed three ways.
"""

from __future__ import annotations

import math
import pickle
import random

import pytest
import torch
from episodes import batch, prompt_ids, text_policy, uniform_policy, walk

from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.tasks import Turn, make_task
from llm_mdp.tasks.multiturn import (
    evaluate_expression,
    guess_number_optimum,
    guess_number_random_reward,
)


def _binary_search(index: int, text: str) -> str:
    """Guess the middle of the numbers the replies so far allow (0..7)."""
    lo, hi = 0, 7
    for guess, reply in zip(text[0::2], text[1::2], strict=False):
        if reply == "<":
            hi = int(guess) - 1
        elif reply == ">":
            lo = int(guess) + 1
    return str((lo + hi) // 2)


def test_guess_number_episode_replies_and_reward() -> None:
    task = make_task("guess_number")
    tok = task.tokenizer
    assert (task.max_turns, task.max_response_tokens, len(task.tokenizer)) == (4, 11, 13)
    ep = walk(task, 5, text_policy(task, _binary_search))
    # 3 -> ">", 5 right: two turns, the env's one token in between is not an action
    eos = tok.eos_token_id
    assert ep.response_ids == [
        *tok.encode("3>5", add_special_tokens=False)[:1],
        eos,
        tok.convert_tokens_to_ids(">"),
        tok.convert_tokens_to_ids("5"),
        eos,
    ]
    assert ep.policy_mask == [True, True, False, True, True]
    assert ep.reward == pytest.approx(1 - 1 / 4)
    # the replay of the protocol finds the same injected token and the end of the episode
    state = task.replay(5, ep.prompt_ids, ep.response_ids)
    assert (state.policy_mask, state.turns, state.ended) == (tuple(ep.policy_mask), 2, True)
    # the reward is the same whether the env gives the mask or the task replays it
    rows = [(5, ep.response_ids, None)]
    assert float(task.score(batch(task, rows))[0]) == pytest.approx(0.75)


def test_guess_number_wrong_lower_higher_invalid_and_turn_cap() -> None:
    task = make_task("guess_number")
    tok = task.tokenizer
    eos = tok.eos_token_id
    script = iter(["6", "a?", "1", "2", "4"])  # "a?" has no digit: answered "!"

    def policy(index: int, ids: list[int], mask: list[bool]) -> list[int]:
        return [*tok.encode(next(script).replace("a", ""), add_special_tokens=False), eos]

    ep = walk(task, 2, policy)
    text = tok.decode(ep.response_ids, skip_special_tokens=True)
    assert text == "6<?!1>2"  # lower than 6, invalid, higher than 1, then right
    assert ep.reward == pytest.approx(1 - 3 / 4)
    never = walk(task, 0, text_policy(task, lambda i, t: "7"))  # 4 wrong turns: the cap
    assert tok.decode(never.response_ids, skip_special_tokens=True) == "7<7<7<7"
    assert never.reward == 0.0


def test_guess_number_optimum_three_ways() -> None:
    task = make_task("guess_number")
    # 1. closed form: binary search finds the i-th of K numbers in floor(log2 i) + 1 turns
    K, M = 8, 4
    mean_turns = sum(math.floor(math.log2(i)) + 1 for i in range(1, K + 1)) / K
    closed = 1 - (mean_turns - 1) / M
    assert closed == 19 / 32
    assert task.optimal_reward == pytest.approx(closed, abs=1e-12)
    assert guess_number_optimum(K, M) == pytest.approx(closed, abs=1e-12)
    # 2. expectimax over the task's own replies and reward: the policy sees only the
    # conversation, so at each history it picks one turn for every hidden number that
    # is consistent with it; one-token turns (every token) cover all distinct moves
    tok = task.tokenizer
    eos = tok.eos_token_id
    turns = [[t, eos] for t in range(len(tok)) if t != eos] + [[eos]]

    def step(s: int, history: tuple[int, ...], move: list[int], n: int):  # type: ignore[no-untyped-def]
        """The conversation after ``move`` for hidden number ``s``, and whether it ended."""
        ids = (*history, *move)
        if n + 1 >= M:
            return ids, True
        mask = task.replay(s, prompt_ids(task, s), history).policy_mask + (True,) * len(move)
        reply = task.reply_fn(Turn(s, tuple(prompt_ids(task, s)), ids, mask, n + 1, tok))  # type: ignore[misc]
        return (ids, True) if reply is None else ((*ids, *reply), False)

    memo: dict[tuple[frozenset[int], int], float] = {}

    def value(history: tuple[int, ...], secrets: frozenset[int], n: int) -> float:
        # what follows depends on the conversation only through the hidden numbers it
        # allows and the turns used (replies answer the last turn alone): memoise on them
        if (secrets, n) in memo:
            return memo[secrets, n]
        best = 0.0
        for move in turns:
            total = 0.0
            groups: dict[tuple[int, ...], set[int]] = {}
            for s in secrets:
                ids, ended = step(s, history, move, n)
                if ended:
                    total += float(task.score(batch(task, [(s, list(ids), None)]))[0])
                else:
                    groups.setdefault(ids, set()).add(s)
            for h, group in groups.items():
                total += len(group) * value(h, frozenset(group), n + 1)
            best = max(best, total / len(secrets))
        memo[secrets, n] = best
        return best

    assert value((), frozenset(range(K)), 0) == pytest.approx(closed, abs=1e-12)
    # 3. binary search played through the replies, every hidden number
    played = [walk(task, s, text_policy(task, _binary_search)).reward for s in range(K)]
    assert sum(played) / K == pytest.approx(closed, abs=1e-12)


def test_guess_number_optimum_values() -> None:
    assert guess_number_optimum(2, 1) == pytest.approx(0.5)  # one turn: a coin flip
    assert guess_number_optimum(3, 2) == pytest.approx((2 + 1 + 1) / 6)
    # too few turns: 2**M - 1 numbers can be reached, the rest score 0
    assert guess_number_optimum(8, 2) == pytest.approx((2 + 1 + 1) / 16)


def test_guess_number_random_reward_matches_monte_carlo() -> None:
    task = make_task("guess_number")
    exact = task.random_reward
    assert exact == pytest.approx(
        guess_number_random_reward(8, 4, task.max_response_tokens, len(task.tokenizer))
    )
    rng = random.Random(0)
    policy = uniform_policy(task, rng)
    n = 3000
    rewards = [walk(task, rng.randrange(8), policy, rng).reward for _ in range(n)]
    mean = sum(rewards) / n
    var = sum((r - mean) ** 2 for r in rewards) / (n - 1)
    assert abs(mean - exact) < 5 * math.sqrt(var / n)
    assert 0.05 < exact < 0.1  # far below the optimum 0.59375


def test_guess_number_free_text_prompt_is_refused() -> None:
    task = make_task("guess_number")
    eos = task.tokenizer.eos_token_id
    with pytest.raises(ValueError, match="prompt_index=-1"):
        task.replay(-1, prompt_ids(task, 0), [1, eos])


def test_evaluate_expression() -> None:
    assert evaluate_expression("2+3*4") == 14
    assert evaluate_expression("37*8") == 296
    assert evaluate_expression("12") == 12
    for bad in ["", "3*", "*3", "2++3", "[2]", "2-1"]:
        assert evaluate_expression(bad) is None


def test_calculator_episode_uses_the_tool() -> None:
    task = make_task("calculator")
    tok = task.tokenizer
    assert (len(task.prompts), task.max_response_tokens, len(tok)) == (720, 14, 17)
    i = task.prompts.index("37*8=")

    def tool_user(index: int, text: str) -> str:
        # first turn: call the tool with the prompt's expression; then copy its value
        return f"[{task.prompts[index][:-1]}]" if not text else text.split("]")[-1]

    ep = walk(task, i, text_policy(task, tool_user))
    assert tok.decode(ep.response_ids, skip_special_tokens=True) == "[37*8]296296"
    n_call = len("[37*8]") + 1
    assert ep.policy_mask == [True] * n_call + [False] * 3 + [True] * 4
    assert len(ep.response_ids) == task.max_response_tokens
    assert ep.reward == 1.0
    # a wrong answer, a bad call then the right answer, and an answer without the tool
    wrong = walk(task, i, text_policy(task, lambda j, t: "[37*8]" if not t else "295"))
    assert wrong.reward == 0.0
    bad = walk(task, i, text_policy(task, lambda j, t: "[3*]" if not t else "296"))
    assert tok.decode(bad.response_ids, skip_special_tokens=True) == "[3*]?296"
    assert bad.reward == 1.0
    assert walk(task, i, text_policy(task, lambda j, t: "296")).reward == 1.0


def test_calculator_turn_cap_and_partial_credit() -> None:
    task = make_task("calculator", partial=True, max_turns=2, max_response_tokens=20)
    i = task.prompts.index("37*8=")
    calls = walk(task, i, text_policy(task, lambda j, t: "[2*3]"))  # never answers
    assert calls.reward == 0.0 and sum(calls.policy_mask) == 2 * 6
    half = walk(task, i, text_policy(task, lambda j, t: "[37*8]" if not t else "206"))
    assert half.reward == pytest.approx(2 / 3)


def test_multiturn_tasks_pickle_and_register_env_ids() -> None:
    import gymnasium as gym

    import llm_mdp  # noqa: F401  (registers the ids)

    for name, env_id in [
        ("guess_number", "llm_mdp/GuessNumber-v0"),
        ("calculator", "llm_mdp/Calculator-v0"),
    ]:
        task = make_task(name)
        again = pickle.loads(pickle.dumps(task))
        ep = walk(task, 3, text_policy(task, lambda j, t: "3"))
        assert walk(again, 3, text_policy(again, lambda j, t: "3")).reward == ep.reward
        assert env_id in gym.registry


def _env_is_multi_turn() -> bool:
    env = LLMTokenVectorEnv(make_task("guess_number"), 1)
    return "policy_mask" in env.single_observation_space.spaces  # type: ignore[attr-defined]


needs_multi_turn_env = pytest.mark.skipif(
    not _env_is_multi_turn(), reason="this env does not run multi-turn episodes yet"
)


@needs_multi_turn_env
def test_guess_number_in_the_env_binary_search_scores_the_optimum() -> None:
    task = make_task("guess_number")
    tok = task.tokenizer
    env = LLMTokenVectorEnv(task, 8)
    obs, _ = env.reset(seed=0, options={"prompt_indices": list(range(8))})
    P, eos = env.P, env.eos_token_id
    rewards = torch.zeros(8, dtype=torch.float64)
    done = torch.zeros(8, dtype=torch.bool)
    while not done.all():
        actions = []
        for row in range(8):
            ids = obs["input_ids"][row, P:][obs["attention_mask"][row, P:].bool()].tolist()
            mine = obs["policy_mask"][row, P:].tolist()[: len(ids)]
            if ids and mine[-1] and ids[-1] != eos:  # the guess is written: end the turn
                actions.append(eos)
            else:  # the episode starts or the env just replied: guess
                guess = _binary_search(row, tok.decode(ids, skip_special_tokens=True))
                actions.append(tok.convert_tokens_to_ids(guess))
        obs, r, term, trunc, _ = env.step(torch.tensor(actions))
        new = (term | trunc) & ~done
        rewards[new] = r[new].double()
        done |= term | trunc
    # binary search over 0..7 guesses 3 first: hidden numbers 3 | 1, 5 | 0, 2, 4, 6 | 7
    found_at = {3: 1, 1: 2, 5: 2, 0: 3, 2: 3, 4: 3, 6: 3, 7: 4}
    assert rewards.tolist() == [1 - (found_at[s] - 1) / 4 for s in range(8)]
    assert float(rewards.mean()) == pytest.approx(task.optimal_reward)
    # the env's replies are not actions: policy_mask is 0 exactly on '<' / '>' tokens
    row7 = obs["input_ids"][7, P:][obs["attention_mask"][7, P:].bool()].tolist()
    mask7 = obs["policy_mask"][7, P:][: len(row7)].tolist()
    replies = {tok.convert_tokens_to_ids(c) for c in "<>"}
    assert mask7 == [0 if t in replies else 1 for t in row7]
    assert tok.decode(row7, skip_special_tokens=True) == "3>5>6>7"


@needs_multi_turn_env
def test_calculator_in_the_env_tool_value_is_injected() -> None:
    task = make_task("calculator")
    tok = task.tokenizer
    env = LLMTokenVectorEnv(task, 1)
    i = task.prompts.index("37*8=")
    obs, _ = env.reset(seed=0, options={"prompt_indices": [i]})
    script = [*tok.encode("[37*8]", add_special_tokens=False), tok.eos_token_id]
    script += [*tok.encode("296", add_special_tokens=False), tok.eos_token_id]
    for a in script:
        obs, r, term, trunc, _ = env.step(torch.tensor([a]))
    assert bool(term[0]) and float(r[0]) == 1.0
    P = env.P
    assert obs["policy_mask"][0, P:].tolist()[:14] == [1] * 7 + [0] * 3 + [1] * 4


def test_train_samples_show_who_said_what() -> None:
    """``llm-mdp train``'s sample table splits a multi-turn response into turns."""
    from llm_mdp.agents import GRPO, GRPOConfig
    from llm_mdp.cli.train import sample_table
    from llm_mdp.policies import CausalLMPolicy, tiny_gpt2

    env = LLMTokenVectorEnv(make_task("guess_number"), 8)
    policy = CausalLMPolicy(tiny_gpt2(env.vocab_size, seed=0), env.tokenizer)
    agent = GRPO(env, policy, GRPOConfig(group_size=4, seed=0))
    rows = sample_table(agent, n=3).splitlines()[1:]
    assert len(rows) == 3
    for row in rows:
        segs = row.split(" -> ", 1)[1].rsplit(" reward ", 1)[0].split(" | ")
        who = [s.split(":", 1)[0] for s in segs]
        assert who[0] == "policy" and set(who) <= {"policy", "env"}
        # turns alternate, and every env reply follows a policy turn that ended with EOS
        assert all(who[k] != who[k + 1] for k in range(len(who) - 1))
        assert all(segs[k].endswith("<eos>'") for k in range(len(who) - 1) if who[k] == "policy")
