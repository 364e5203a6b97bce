"""Ecosystem adapters (llm_mdp.tasks.adapters): reasoning-gym datasets as tasks, and
text environments (a local one, GEM, TextArena) as multi-turn tasks.

Each optional package is skipped when it is not installed; all of them generate their
data locally.
"""

from __future__ import annotations

import pickle
import re

import pytest
from episodes import batch, text_policy, walk

from llm_mdp.tasks import make_task, text_env_task


def test_reasoning_gym_task_scores_with_the_dataset_scorer() -> None:
    rg = pytest.importorskip("reasoning_gym")
    config = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    task = make_task("rg:chain_sum", size=8, seed=3, **config)
    ds = rg.create_dataset("chain_sum", size=8, seed=3, **config)
    assert list(task.prompts) == [e["question"] for e in ds]
    assert task.optimal_reward == 1.0
    answers = [str(e["answer"]) for e in ds]
    assert task.max_response_tokens == max(len(a) for a in answers) + 1
    # one episode: answer each question right, and once wrong (its answer + 1)
    rows = []
    for i, a in enumerate(answers):
        ids = task.tokenizer.encode(a, add_special_tokens=False)
        rows.append((i, [*ids, task.tokenizer.eos_token_id], None))
    wrong = str(int(answers[0]) + 1)
    rows.append((0, [*task.tokenizer.encode(wrong, add_special_tokens=False)], None))
    scores = task.score(batch(task, rows)).tolist()
    assert scores == [1.0] * 8 + [float(ds.score_answer(wrong, ds[0]))] == [1.0] * 8 + [0.0]
    # the reward pickles as its arguments and regenerates the same dataset
    again = pickle.loads(pickle.dumps(task))
    assert again.score(batch(again, rows)).tolist() == scores


def test_reasoning_gym_unparsable_answer_scores_zero() -> None:
    rg = pytest.importorskip("reasoning_gym")
    task = make_task("rg:prime_factorization", size=4, seed=0)
    answer = str(rg.create_dataset("prime_factorization", size=4, seed=0)[0]["answer"])
    enc = task.tokenizer.encode
    eos = task.tokenizer.eos_token_id
    # the scorer raises on letters: a wrong answer, not a failed run
    rows = [(0, [*enc("e", add_special_tokens=False), eos], None)]
    rows.append((0, [*enc(answer, add_special_tokens=False), eos], None))
    assert task.score(batch(task, rows)).tolist() == [0.0, 1.0]


def test_reasoning_gym_unknown_dataset_names_the_known_ones() -> None:
    pytest.importorskip("reasoning_gym")
    with pytest.raises(ValueError, match=r"known datasets: .*chain_sum"):
        make_task("rg:no_such_dataset")


class CountTo:
    """A local text env: say the numbers 1..n one per turn (n = 2 + seed % 3).

    Reward 1 per right number, -1 and the end on a wrong one; ``done`` after n.
    Counts its resets and steps, to check the adapter's cache.
    """

    resets = 0
    steps = 0

    def reset(self, seed: int) -> str:
        CountTo.resets += 1
        self.n, self.said = 2 + seed % 3, 0
        return f"count to {self.n}"

    def step(self, text: str) -> tuple[str, float, bool]:
        CountTo.steps += 1
        if text != str(self.said + 1):
            return "wrong", -1.0, True
        self.said += 1
        return "ok", 1.0, self.said == self.n


def test_text_env_task_replays_the_env_and_sums_its_rewards() -> None:
    CountTo.resets = CountTo.steps = 0
    task = text_env_task(CountTo, seeds=[0, 1, 2], name="count", max_response_tokens=40)
    assert list(task.prompts) == ["count to 2", "count to 3", "count to 4"]
    counter = text_policy(task, lambda i, t: str(t.count("ok") + 1))
    ep = walk(task, 2, counter)
    assert ep.text(task).replace("<eos>", "|") == "1|\nok\n2|\nok\n3|\nok\n4|"
    assert ep.reward == 4.0
    assert sum(ep.policy_mask) == 8 and len(ep.response_ids) - 8 == 3 * len("\nok\n")
    # each turn stepped the live env of its parent history once: no replay, and
    # scoring the finished episode was served from the cache
    assert (CountTo.resets, CountTo.steps) == (3 + 1, 4)
    bad = walk(task, 1, text_policy(task, lambda i, t: "1" if not t else "3"))
    assert bad.reward == 1.0 - 1.0  # "1" right, "3" wrong: the env ends it
    # a fresh copy (no cache) replays the history from the seed and agrees
    again = pickle.loads(pickle.dumps(task))
    rows = [(2, ep.response_ids, None), (1, bad.response_ids, None)]
    assert again.score(batch(again, rows)).tolist() == [4.0, 0.0]
    # the turn cap: the reward steps the last turn itself (reply_fn is not called on it)
    capped = text_env_task(CountTo, seeds=[2], max_turns=2, max_response_tokens=40)
    assert walk(capped, 0, text_policy(capped, lambda i, t: str(t.count("ok") + 1))).reward == 2.0


def _raw_rewards(make_env, seed: int, turns: list[str]) -> float:  # type: ignore[no-untyped-def]
    env = make_env()
    env.reset(seed)
    return sum(env.step(t)[1] for t in turns)


def _turns(task, ep) -> list[str]:  # type: ignore[no-untyped-def]
    from llm_mdp.tasks.multiturn import policy_turns

    eos = task.tokenizer.eos_token_id
    return [task.tokenizer.decode(t) for t in policy_turns(ep.response_ids, ep.policy_mask, eos)]


def _boxed(n: int) -> str:
    return "\\boxed{" + str(n) + "}"


def test_gem_guess_the_number_episode() -> None:
    gem = pytest.importorskip("gem")
    from llm_mdp.tasks.adapters import GemEnv

    task = make_task("gem:game:GuessTheNumber-v0-easy", seeds=[0], max_response_tokens=400)
    assert task.prompts[0].startswith("You are playing Guess The Number.")
    raw = gem.make("game:GuessTheNumber-v0-easy")
    raw.reset(seed=0)
    secret = raw.game_number

    def search(index: int, text: str) -> str:
        lo, hi = 1, 10
        for g, d in re.findall(r"you guessed (\d+), and the target number is (\w+)", text):
            lo, hi = (int(g) + 1, hi) if d == "higher" else (lo, int(g) - 1)
        return _boxed((lo + hi) // 2)

    ep = walk(task, 0, text_policy(task, search))
    turns = _turns(task, ep)
    assert turns[-1] == _boxed(secret)
    assert ep.reward == _raw_rewards(GemEnv("game:GuessTheNumber-v0-easy"), 0, turns) == 1.0
    injected = [t for t, m in zip(ep.response_ids, ep.policy_mask, strict=True) if not m]
    assert "target number is" in task.tokenizer.decode(injected)
    wrong = walk(task, 0, text_policy(task, lambda i, t: _boxed(secret % 10 + 1)))
    assert len(_turns(task, wrong)) == 4  # the game's own turn limit ended it
    assert wrong.reward == _raw_rewards(
        GemEnv("game:GuessTheNumber-v0-easy"), 0, _turns(task, wrong)
    )


def test_textarena_guess_the_number_episode() -> None:
    pytest.importorskip("textarena")
    from llm_mdp.tasks.adapters import TextArenaEnv

    task = make_task("ta:GuessTheNumber-v0", seeds=[1], max_response_tokens=400)
    assert "Guess The Number" in task.prompts[0]

    def search(index: int, text: str) -> str:
        lo, hi = 1, 20
        for g, d in re.findall(r"\[(\d+)\]\s*\[GAME\] The target number is (\w+)", text):
            lo, hi = (int(g) + 1, hi) if d == "higher" else (lo, int(g) - 1)
        return f"[{(lo + hi) // 2}]"

    ep = walk(task, 0, text_policy(task, search))
    turns = _turns(task, ep)
    assert ep.reward == _raw_rewards(TextArenaEnv("GuessTheNumber-v0"), 1, turns) == 1.0
    assert 1 <= len(turns) <= 5  # binary search over 1..20
    injected = [t for t, m in zip(ep.response_ids, ep.policy_mask, strict=True) if not m]
    assert task.tokenizer.decode(injected).count("[GAME] The target number is") == len(turns) - 1


def test_cli_task_names_reach_the_families() -> None:
    from llm_mdp.cli.build import check_task_args
    from llm_mdp.cli.catalogue import catalogue
    from llm_mdp.cli.options import CLIError

    args = {"size": 8, "min_terms": 2}  # a factory argument and a dataset option
    assert check_task_args("rg:chain_sum", args) == args
    assert check_task_args("guess_number", {"num_values": 4}) == {"num_values": 4}
    with pytest.raises(CLIError, match=r"task families: gem:<name>, rg:<name>, ta:<name>"):
        check_task_args("nope", {})
    listing = catalogue()
    for line in ("guess_number", "calculator", "rg:<name>", "gem:<name>", "ta:<name>"):
        assert line in listing
