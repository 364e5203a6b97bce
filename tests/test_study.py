"""Studies: the cost counters, the statistics, and a built-in study stopped and resumed."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llm_mdp import LLMTokenVectorEnv
from llm_mdp.agents import GRPO, GRPOConfig, TRePO
from llm_mdp.agents.remax import ReMax, ReMaxConfig
from llm_mdp.agents.rollout import rollout
from llm_mdp.agents.trepo import TRePOConfig
from llm_mdp.cli import main
from llm_mdp.policies import CausalLMPolicy, tiny_gpt2
from llm_mdp.study import StudyError, load_study, run_study
from llm_mdp.study.runner import extend_grids
from llm_mdp.study.stats import bootstrap_ci, holm, permutation_test, window_means
from llm_mdp.study.variance import gradient_samples, relative_variance


def _setup(num_envs: int = 8) -> tuple[LLMTokenVectorEnv, CausalLMPolicy]:
    torch.manual_seed(0)
    env = LLMTokenVectorEnv("reverse", num_envs=num_envs, task_kwargs={"partial": True})
    policy = CausalLMPolicy(tiny_gpt2(env.vocab_size, seed=0), env.tokenizer, seed=0)
    return env, policy


# ---------------------------------------------------------------------- cost counters
def test_grpo_generates_exactly_the_tokens_it_trains_on() -> None:
    env, policy = _setup()
    agent = GRPO(env, policy, GRPOConfig(group_size=4, kl_coef=0.0, seed=0))
    hist = agent.learn(3, progress=False)
    assert agent.generated_tokens == agent.tokens == hist[-1]["generated_tokens"] > 0


def test_remax_counts_its_greedy_baseline_tokens() -> None:
    env, policy = _setup()
    agent = ReMax(env, policy, ReMaxConfig(seed=0))
    # the same prompts the update will draw, answered greedily by the same policy
    state = agent.rng.bit_generator.state
    idx = agent.sample_prompts(env.num_envs)
    agent.rng.bit_generator.state = state
    other = LLMTokenVectorEnv("reverse", num_envs=env.num_envs, task_kwargs={"partial": True})
    greedy = rollout(other, policy, {"prompt_indices": idx}, greedy=True)
    m = agent.train_step()
    assert m["generated_tokens"] == m["tokens"] + int(greedy.response_mask.sum())


def test_trepo_counts_its_value_rollout_tokens() -> None:
    env, policy = _setup()
    agent = TRePO(env, policy, TRePOConfig(group_size=4, num_anchors=1, seed=0))
    m = agent.train_step()
    value_rollouts = m["episodes"] - env.num_envs  # every value rollout is one episode
    extra = m["generated_tokens"] - m["tokens"]
    assert value_rollouts > 0
    assert value_rollouts <= extra <= value_rollouts * env.R  # 1..R tokens each


def test_forward_positions_match_the_policy_counters_and_training_passes() -> None:
    env, policy = _setup()
    agent = GRPO(env, policy, GRPOConfig(group_size=4, kl_coef=0.0, epochs=2, seed=0))
    trained: list[int] = []
    log_probs = policy.log_probs

    def spy(ids: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        # the last position predicts nothing: log_probs runs the trunk on W - 1 of them
        trained.append(ids.shape[0] * (ids.shape[1] - 1))
        return log_probs(ids, *args, **kw)

    policy.log_probs = spy  # type: ignore[method-assign]
    m = agent.train_step()
    acting = policy.positions_encoded + policy.positions_decoded
    assert len(trained) == 2  # one pass per epoch
    assert m["forward_positions"] == acting + sum(trained)


def test_a_deep_copied_agent_counts_its_own_forward_positions() -> None:
    env, policy = _setup()
    agent = GRPO(env, policy, GRPOConfig(group_size=4, kl_coef=0.0, seed=0))
    twin = copy.deepcopy(agent)
    m = twin.train_step()
    assert agent._forward.count == 0 < twin._forward.count == m["forward_positions"]


def test_learn_stops_at_the_generated_token_budget() -> None:
    env, policy = _setup()
    agent = TRePO(env, policy, TRePOConfig(group_size=4, num_anchors=1, seed=0))
    hist = agent.learn(total_generated_tokens=300, progress=False)
    gen = [h["generated_tokens"] for h in hist]
    assert gen[-1] >= 300 > gen[-2]  # the update that crosses the budget is the last


# ---------------------------------------------------------------------- statistics
def test_window_means_weight_each_update_by_its_tokens() -> None:
    # updates generated (0, 4], (4, 10], (10, 12] with rewards 1, 0, 0.5
    out = window_means([4, 10, 12], [1.0, 0.0, 0.5], [0, 5, 10, 12, 14])
    np.testing.assert_allclose(out, [0.8, 0.0, 0.5, 0.5])  # (4*1 + 1*0) / 5 = 0.8


def test_permutation_test_and_holm_exact_values() -> None:
    # complete separation of 5 vs 5: only the observed split and its mirror are as extreme
    assert permutation_test([5, 6, 7, 8, 9], [0, 1, 2, 3, 4]) == pytest.approx(2 / 252)
    assert permutation_test([1, 2], [1, 2]) == 1.0
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_bootstrap_interval_covers_the_mean_at_the_nominal_rate() -> None:
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(200):
        x = rng.normal(0.0, 1.0, size=30)
        lo, hi = bootstrap_ci(x, rng, n=2000)
        hits += lo <= 0.0 <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_a_best_rate_on_the_edge_of_its_grid_extends_the_grid() -> None:
    grids = {"a": [1e-3, 3e-3, 1e-2], "b": [1e-3, 3e-3, 1e-2], "c": [1e-3, 3e-3, 1e-2]}
    assert extend_grids(grids, {"a": 1e-2, "b": 3e-3, "c": 1e-3})
    assert grids["a"][-1] == pytest.approx(1e-2 * 1e-2 / 3e-3)
    assert grids["b"] == [1e-3, 3e-3, 1e-2]  # an interior best: the grid stays
    assert grids["c"][0] == pytest.approx(1e-3 * 1e-3 / 3e-3)
    assert not extend_grids({"b": [1e-3, 3e-3, 1e-2]}, {"b": 3e-3})


# ---------------------------------------------------------------------- the study
def _results(out: Path) -> dict[str, Any]:
    s = json.loads((out / "summary.json").read_text())
    s.pop("timing")  # wall-clock seconds differ between any two runs
    return s


@pytest.mark.slow
def test_builtin_study_stopped_and_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    spec, _ = load_study("tiny")
    n = len(spec.tune_runs()) + len(spec.agents) * len(spec.tasks) * len(spec.seeds)
    whole = run_study(spec, tmp_path / "whole", progress=False, log=lambda s: None)
    assert whole is not None
    # stop in the tuning phase, then in the reported grid, then finish
    out = tmp_path / "resumed"
    assert run_study(spec, out, max_runs=3, progress=False) is None
    assert len(list((out / "runs").glob("*.json"))) == 3
    assert not (out / "summary.json").exists()
    assert run_study(spec, out, max_runs=3, progress=False) is None
    assert len(list((out / "runs").glob("*.json"))) == 6
    code = main(["study", "tiny", "--out", str(out), "--no-progress"])
    assert code == 0
    assert len(list((out / "runs").glob("*.json"))) == n
    assert _results(out) == _results(tmp_path / "whole")
    for name in ("summary.csv", "tiny_curves.png", "tiny_costs.png", "tuning.json"):
        assert (out / name).exists(), name
    res = whole["results"]["reverse"]
    assert set(res) == {"grpo", "trepo"}
    tuning = json.loads((out / "tuning.json").read_text())
    for label, r in res.items():
        assert r["learning_rate"] == tuning["learning_rates"][label]
        lo, hi = r["final_ci"]
        assert lo <= r["final"] <= hi
        assert len(r["final_per_seed"]) == len(spec.seeds)
        assert r["forward_per_generated"] > 1  # prompts and training passes cost positions
    # every run stopped at the first update reaching the budget
    for path in (out / "runs").glob("*.json"):
        rows = json.loads(path.read_text())["rows"]
        assert rows[-1]["generated_tokens"] >= spec.budget
        assert len(rows) == 1 or rows[-2]["generated_tokens"] < spec.budget
    assert not math.isnan(whole["comparisons"]["reverse"][0]["p_permutation"])


def test_a_changed_study_is_refused_in_the_same_folder(tmp_path: Path) -> None:
    spec, _ = load_study("tiny")
    assert run_study(spec, tmp_path, max_runs=1, progress=False) is None
    spec.budget += 1
    with pytest.raises(StudyError, match="other settings"):
        run_study(spec, tmp_path, progress=False)


def test_study_file_errors_name_the_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('tasks = ["reverse"]\nseeds = [0]\nbudget = 10\n[agents.nope]\n')
    with pytest.raises(StudyError, match="agent 'nope'"):
        load_study(bad)
    bad.write_text(
        'tasks = ["reverse"]\nseeds = [0, 1]\nbudget = 10\n[agents.grpo]\n'
        "[tune]\nseed = 1\nlearning_rates = [0.01]\n"
    )
    with pytest.raises(StudyError, match="tune seed 1 is a reported seed"):
        load_study(bad)
    assert main(["study", str(tmp_path / "missing.toml")]) == 2


# ---------------------------------------------------------------------- variance in practice
def test_relative_variance_exact_value() -> None:
    r = relative_variance(torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64))
    # tr Cov = 2 (n - 1 = 1); |E g|^2 = |mean|^2 - tr Cov / n = 4 - 1 = 3
    assert r["trace_cov"] == pytest.approx(2.0)
    assert r["relative_variance"] == pytest.approx(2.0 / 3.0)


def test_gradient_samples_are_the_updates_gradients_at_fixed_weights() -> None:
    env, policy = _setup()
    cfg = GRPOConfig(group_size=4, max_grad_norm=None, seed=0)
    agent = GRPO(env, policy, cfg)
    before = [p.detach().clone() for p in policy.parameters()]
    g = gradient_samples(agent, 3)
    assert agent.update == 0
    assert all(torch.equal(a, p) for a, p in zip(before, policy.parameters(), strict=True))
    assert g.shape[0] == 3 and not torch.equal(g[0], g[1])  # fresh batches
    # the first sample is the gradient the agent's own first update takes
    seen: list[torch.Tensor] = []
    step = agent.optimizer.step

    def spy(*args: Any, **kw: Any) -> Any:
        seen.append(torch.cat([p.grad.double().flatten() for p in policy.parameters()]))
        return step(*args, **kw)

    agent.optimizer.step = spy  # type: ignore[method-assign]
    agent.train_step()
    torch.testing.assert_close(g[0], seen[0])


def test_every_builtin_study_loads() -> None:
    """The shipped TOML files parse and pass the grid checks; the real-model study runs
    GRPO, RLOO and TRePO on SmolLM2 at one learning rate, untuned (it sets each one)."""
    from llm_mdp.study.spec import builtin_studies

    names = set(builtin_studies())
    assert {"tiny", "main", "ablation", "smollm2"} <= names
    for name in names:
        load_study(name)
    spec, _ = load_study("smollm2")
    runs = spec.main_runs({})
    assert spec.model == "smollm2" and spec.tasks == ["chat_keyword"]
    assert sorted({r.agent for r in runs}) == ["grpo", "rloo", "trepo"] and len(runs) == 9
    assert {r.config["learning_rate"] for r in runs} == {2e-5}
