"""Agents with the off-policy estimators: sampling from mu, corrections, GSPO, CISPO, DAPO."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_mdp import estimators_offpolicy as offp
from llm_mdp.agents import GRPO, GRPOConfig, REINFORCEPPConfig
from llm_mdp.agents.offpolicy import behavior_sampling, prepare_behavior
from llm_mdp.agents.rollout import rollout
from llm_mdp.policies import TabularPolicy
from llm_mdp.policies.sampling import truncate_log_probs
from llm_mdp.tasks import Task, char_tokenizer
from llm_mdp.theory import paper_setup
from llm_mdp.theory.offpolicy import _keep_top
from llm_mdp.theory.setups import ACTIONS, EOS, A

sys.path.insert(0, str(Path(__file__).parent))
from test_agents import make_agent


def learns_target_token(name: str, **cfg: Any) -> None:
    agent = make_agent(name, **cfg)
    hist = agent.learn(30, progress=False)
    if not agent.config.samples_off_policy:  # top-k / top-p sampling starts higher
        assert sum(h["reward/mean"] for h in hist[:3]) / 3 < 0.3
    assert sum(h["reward/mean"] for h in hist[-3:]) / 3 > 0.55, [
        round(h["reward/mean"], 2) for h in hist
    ]
    assert agent.evaluate(greedy=True) > 0.9  # the optimum, 1.0, greedily


NO_KL = {"kl_coef": 0.0}
ESTIMATORS: dict[str, tuple[str, dict[str, Any]]] = {
    "gspo": ("grpo", NO_KL | {"importance_sampling_level": "sequence", "clip_low": 3e-4,
                              "clip_high": 4e-4}),
    "cispo": ("grpo", NO_KL | {"loss": "cispo", "loss_options": {"clip_high": 4.0},
                               "aggregation": "token-mean"}),
    "dapo": ("grpo", NO_KL | {"clip_high": 0.28, "aggregation": "token-mean",
                              "dynamic_sampling": True}),
    "reinforce_pp": ("reinforce_pp", {}),
    "reinforce_pp_baseline": ("reinforce_pp", {"baseline": "group", "group_size": 4}),
    "tis_top_p": ("grpo", NO_KL | {"top_p": 0.8, "sampling_temperature": 0.8,
                                   "behavior_correction": "tis"}),
    "mis_top_k": ("grpo", NO_KL | {"top_k": 3, "behavior_correction": "mis"}),
    "seq_tis_temperature": ("rloo", NO_KL | {"group_size": 4, "sampling_temperature": 1.5,
                                             "behavior_correction": "seq_tis",
                                             "behavior_cap": 5.0}),
    "seq_mis_temperature": ("rloo", NO_KL | {"group_size": 4, "sampling_temperature": 1.3,
                                             "behavior_correction": "seq_mis",
                                             "behavior_cap": 5.0}),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_new_estimator_trains_an_agent_to_the_optimum(estimator: str) -> None:
    name, cfg = ESTIMATORS[estimator]
    learns_target_token(name, **cfg)


def first_a_task() -> Task:
    """Reward 1 iff the response starts with ``a``, whatever its length."""
    return Task.from_text_fn(
        "first_a",
        ["b", "cd", "d", "ca"],
        lambda p, r: [float(x.startswith("a")) for x in r],
        char_tokenizer("abcd"),
        max_response_tokens=8,
        optimal_reward=1.0,
    )


@pytest.mark.slow
def test_overlong_penalty_trains_short_optimal_responses() -> None:
    """DAPO's soft penalty over the last 4 of 8 tokens: the penalised optimum is reward 1
    with at most 4 tokens; without it the policy drifts to the cap."""
    lengths = {}
    for cache in (4, 0):
        agent = make_agent("grpo", first_a_task(), kl_coef=0.0, overlong_cache=cache)
        agent.learn(30, progress=False)
        ro = rollout(agent.env, agent.policy, {"prompt_indices": [0, 1, 2, 3] * 4}, greedy=True)
        assert float(ro.rewards.min()) == 1.0
        lengths[cache] = ro.response_lengths
    assert int(lengths[4].max()) <= 4
    assert int(lengths[0].max()) > 4


def test_overlong_penalty_and_dynamic_sampling_closed_forms() -> None:
    pen = offp.overlong_penalty(torch.tensor([1, 4, 5, 6, 8, 9]), max_len=8, cache_len=4)
    assert pen.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    keep = offp.dynamic_sampling_keep(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2)
    assert keep.tolist() == [False, True, False]


def test_sampler_truncation_is_the_exact_toolkits_behavior_policy() -> None:
    """``truncate_log_probs`` (the rollout sampler) and the theory's top-k / top-p agree."""
    m = paper_setup(seed=3)
    live = ~m.tree.forced
    for k, p in ((2, None), (None, 0.9), (None, 0.6)):
        keep = _keep_top(m.pi, k, p)[live]
        lp = truncate_log_probs(m.log_pi[live], top_k=k or 0, top_p=p or 1.0)
        assert torch.equal(torch.isfinite(lp), keep)
        assert torch.allclose(lp.exp().sum(1), torch.ones(int(live.sum()), dtype=torch.float64))


def test_rollout_records_behavior_log_probs_and_update_gets_pi_old() -> None:
    agent = make_agent("grpo", num_envs=8, top_k=1, kl_coef=0.0)
    cfg = agent.config
    assert cfg.samples_off_policy
    with behavior_sampling(agent.policy, cfg):
        batch = agent.collect()
    assert (agent.policy.top_k, agent.policy.top_p) == (0, 1.0)  # restored
    mask = batch.response_mask.bool()
    assert torch.all(batch.sample_logp[mask] == 0.0)  # top-1 sampling: mu(w) = 1
    prepare_behavior(agent, batch)
    assert torch.all(batch.behavior_logp[mask] == 0.0)
    with torch.no_grad():
        pi = agent.policy.log_probs(batch.input_ids, batch.attention_mask, batch.prompt_width)
    assert torch.allclose(batch.sample_logp[mask], pi[mask])
    assert float(batch.sample_logp[mask].max()) < 0.0  # pi is not the greedy policy
    m = agent.train_step()
    assert math.isfinite(m["loss/total"])


def test_grpo_sequence_level_is_gspo_and_config_errors() -> None:
    env_agent = make_agent("grpo", num_envs=4, importance_sampling_level="sequence")
    assert isinstance(env_agent, GRPO) and env_agent.policy_loss_name == "gspo"
    with pytest.raises(TypeError, match=r"importance_sampling_level='seq': expected one of"):
        GRPOConfig(importance_sampling_level="seq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="replaces loss='ppo_clip'"):
        GRPOConfig(importance_sampling_level="sequence", loss="cispo")
    with pytest.raises(ValueError, match="unknown behavior correction 'tis2'"):
        GRPOConfig(behavior_correction="tis2")
    with pytest.raises(ValueError, match="top_p"):
        GRPOConfig(top_p=0.0)
    with pytest.raises(ValueError, match="dynamic_sampling=True needs group_size >= 2"):
        REINFORCEPPConfig(dynamic_sampling=True)
    with pytest.raises(ValueError, match="needs group_size >= 2"):
        REINFORCEPPConfig(baseline="group")


def test_behavior_sampling_rejects_a_policy_without_truncation() -> None:
    class Plain:
        temperature = 1.0

    cfg = GRPOConfig(top_p=0.5)
    with (
        pytest.raises(TypeError, match="no 'top_k' sampling attribute"),
        behavior_sampling(Plain(), cfg),
    ):
        pass
    assert TabularPolicy(len(ACTIONS), EOS, 2, [(A,)], seed=0).top_p == 1.0
