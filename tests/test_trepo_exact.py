"""TRePO's agent path against the exact gradient of a tabular policy.

The whole agent pipeline -- env rollouts, Monte Carlo value rollouts from prefixes via
``env.reset(options={"response_prefix": ...})``, the registered ``trepo`` estimator and
the loss -- is averaged over many batches and z-tested against ``grad J`` computed by
enumerating every response (``llm_mdp.theory``).
"""

from __future__ import annotations

import math

import pytest
import torch

from llm_mdp.agents import TRePO
from llm_mdp.agents.trepo import TRePOConfig
from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.policies import TabularPolicy
from llm_mdp.tasks import hidden_rewards_task
from llm_mdp.theory import ExactModel


def z_scores(n_batches: int, **cfg: object) -> torch.Tensor:
    task = hidden_rewards_task(alphabet="ab", max_response_tokens=3, prompts=("a",), seed=0)
    env = LLMTokenVectorEnv(task, 16)
    prompt = tuple(task.tokenizer("a").input_ids)
    policy = TabularPolicy(env.vocab_size, env.eos_token_id, 3, [prompt], seed=0)
    exact = ExactModel.from_task(policy, task, length_cap="env")
    config = TRePOConfig(seed=0, group_size=4, loss="vanilla", rollouts_per_prefix=1, **cfg)  # type: ignore[arg-type]
    agent = TRePO(env, policy, config)
    grads = []
    for _ in range(n_batches):
        batch = agent.collect()
        batch.advantages = agent.advantages(batch).float()
        agent.optimizer.zero_grad(set_to_none=True)
        agent.accumulate_gradients(
            batch
        )  # loss = -mean_i sum_t A_t log pi (vanilla, seq-mean-token-sum)
        assert policy.logits.grad is not None
        grads.append(-policy.logits.grad.double().flatten())
        agent.update += 1  # fresh random streams, the policy unchanged
    g = torch.stack(grads)
    mean, se = g.mean(0), g.std(0) / math.sqrt(n_batches)
    target = exact.grad_J.to(mean.dtype)
    live = se > 1e-9
    assert torch.all((mean - target)[~live].abs() < 1e-9)  # forced nodes
    return (mean - target)[live] / se[live]


@pytest.mark.slow
def test_trepo_all_positions_is_unbiased() -> None:
    z = z_scores(600, num_anchors=None, value_estimates="fresh")
    assert z.abs().max() < 4.0, z  # Bonferroni over ~30 coordinates at 1e-3


@pytest.mark.slow
def test_trepo_one_anchor_interpolated_is_biased() -> None:
    z = z_scores(600, num_anchors=1, value_estimates="shared", interpolation="linear")
    assert z.abs().max() > 6.0, z  # about 8 at this seed and budget
