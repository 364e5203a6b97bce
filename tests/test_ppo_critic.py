"""PPO's critic options: a trunk copy, a value head on the policy's trunk, a smaller trunk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llm_mdp.agents import PPO
from llm_mdp.agents.ppo import PPOConfig, SharedValueHead, ValueModel
from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.policies import CausalLMPolicy, tiny_gpt2, tiny_llama


def make_ppo(
    critic: str, num_envs: int = 16, run_dir: Any = None, model: Any = None, **cfg: Any
) -> PPO:
    env = LLMTokenVectorEnv("target_token", num_envs)
    model = model if model is not None else tiny_gpt2(env.vocab_size, seed=0)
    policy = CausalLMPolicy(model, env.tokenizer)
    config = PPOConfig(learning_rate=3e-3, seed=0, critic=critic, **cfg)
    return PPO(env, policy, config, run_dir=run_dir)


def params(agent: PPO) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for m in agent.modules.values() for p in m.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["copy", "shared", "small"])
def test_each_critic_learns_target_token(critic: str) -> None:
    """The PPO learning set-up of tests/test_agents.py (optimum 1.0, random ~0.1)."""
    agent = make_ppo(critic)
    hist = agent.learn(30, progress=False)
    first = sum(h["reward/mean"] for h in hist[:3]) / 3
    last = sum(h["reward/mean"] for h in hist[-3:]) / 3
    assert first < 0.3
    assert last > 0.55, [round(h["reward/mean"], 2) for h in hist]
    assert agent.evaluate(greedy=True) > 0.9  # the greedy answer is the target everywhere


@pytest.mark.parametrize("critic", ["shared", "small"])
def test_resume_equals_uninterrupted_run(critic: str, tmp_path: Path) -> None:
    straight = make_ppo(critic, num_envs=8)
    straight.learn(4, progress=False)
    first = make_ppo(critic, num_envs=8, run_dir=tmp_path)
    first.learn(2, progress=False)
    assert first.checkpoint_path is not None
    fresh = make_ppo(critic, num_envs=8)
    resumed = PPO.load(first.checkpoint_path, fresh.env, fresh.policy, run_dir=tmp_path)
    assert isinstance(resumed, PPO) and resumed.config.critic == critic
    resumed.learn(4, progress=False)
    torch.testing.assert_close(params(resumed), params(straight), atol=1e-6, rtol=0)


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("chunked", [False, True])
def test_shared_critic_reads_the_policy_trunk_in_one_forward(builder: Any, chunked: bool) -> None:
    """log_probs_and_hidden gives log_probs' numbers, and the shared head's values equal a
    ValueModel over the very same trunk (the copy critic's definition of V(s_t))."""
    torch.manual_seed(0)
    env = LLMTokenVectorEnv("target_token", 6)
    policy = CausalLMPolicy(builder(env.vocab_size, seed=0), env.tokenizer, chunked_head=chunked)
    agent = PPO(env, policy, PPOConfig(seed=0, critic="shared"))
    batch = agent.collect()
    head = agent.critic
    assert isinstance(head, SharedValueHead)
    torch.nn.init.normal_(head.head.weight)  # zero-initialized: give it something to read
    ids, attn, P = batch.input_ids, batch.attention_mask, batch.prompt_width
    logp, ent, hidden = policy.log_probs_and_hidden(ids, attn, P, with_entropy=True)
    ref_logp, ref_ent = policy.log_probs_and_entropy(ids, attn, P)
    torch.testing.assert_close(logp, ref_logp, atol=1e-6, rtol=0)
    assert ent is not None
    torch.testing.assert_close(ent, ref_ent, atol=1e-6, rtol=0)
    with torch.no_grad():
        values = agent.values(batch)
        copy = ValueModel(policy.model.base_model, hidden.shape[-1])
        copy.head.load_state_dict(head.head.state_dict())
        expect = copy(ids, attn, P)
    torch.testing.assert_close(values, expect, atol=1e-5, rtol=0)
    assert values.abs().max() > 1e-3


def test_shared_value_loss_reaches_the_trunk_with_vf_coef() -> None:
    """Only the value loss (zero advantages, no KL): the policy trunk's gradient is
    ``vf_coef`` times that of ``vf_coef = 1``."""
    grads = {}
    for coef in (1.0, 0.25):
        agent = make_ppo("shared", num_envs=8, vf_coef=coef, kl_coef=0.0)
        torch.manual_seed(1)  # the same head for both: zero-initialized, it passes no gradient
        torch.nn.init.normal_(agent.critic.head.weight)  # type: ignore[union-attr]
        batch = agent.collect()
        batch.advantages = torch.zeros_like(agent.advantages(batch))
        batch.returns = batch.rewards[:, None] * batch.response_mask  # a target != values
        agent.optimizer.zero_grad(set_to_none=True)
        agent.accumulate_gradients(batch)
        trunk = agent.policy.model.base_model  # type: ignore[attr-defined]
        grads[coef] = torch.cat([p.grad.flatten() for p in trunk.parameters()])
    assert grads[1.0].abs().max() > 1e-5
    torch.testing.assert_close(grads[0.25], 0.25 * grads[1.0], atol=1e-9, rtol=1e-5)


def test_small_critic_is_the_policys_first_layers() -> None:
    """A small critic with every layer is the copy critic; with fewer, its blocks are the
    policy's first ones and it has fewer parameters."""
    whole = make_ppo("small", num_envs=4, critic_layers=2)  # tiny_gpt2 has 2 layers
    copy = make_ppo("copy", num_envs=4)
    batch = copy.collect()
    torch.nn.init.normal_(whole.critic.head.weight)  # type: ignore[union-attr]
    copy.critic.head.load_state_dict(whole.critic.head.state_dict())  # type: ignore[union-attr]
    with torch.no_grad():
        torch.testing.assert_close(whole.values(batch), copy.values(batch), atol=1e-6, rtol=0)
    half = make_ppo("small", num_envs=4)
    trunk = half.critic.trunk  # type: ignore[union-attr]
    policy_trunk = half.policy.model.base_model  # type: ignore[attr-defined]
    assert len(trunk.h) == 1 < len(policy_trunk.h)
    for (name, p), q in zip(
        trunk.h[0].named_parameters(), policy_trunk.h[0].parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    n_half = sum(p.numel() for p in half.critic.parameters())
    n_copy = sum(p.numel() for p in copy.critic.parameters())
    assert n_half < n_copy


def test_small_critic_from_a_llama_trunk() -> None:
    env = LLMTokenVectorEnv("target_token", 4)
    model = tiny_llama(env.vocab_size, seed=0)
    agent = make_ppo("small", num_envs=4, model=model, critic_layers=1)
    assert agent.critic.trunk.config.num_hidden_layers == 1  # type: ignore[union-attr]
    (m,) = agent.learn(1, progress=False)
    assert m["loss/value"] > 0


def test_critic_config_errors() -> None:
    with pytest.raises(ValueError, match="critic='big': expected one of copy, shared, small"):
        PPOConfig(critic="big")
    with pytest.raises(ValueError, match="critic_layers=2 is only used with critic='small'"):
        PPOConfig(critic_layers=2)
    with pytest.raises(ValueError, match="critic_layers=0"):
        PPOConfig(critic="small", critic_layers=0)
    with pytest.raises(ValueError, match=r"critic_layers=5: expected 1 \.\. 2"):
        make_ppo("small", num_envs=4, critic_layers=5)
