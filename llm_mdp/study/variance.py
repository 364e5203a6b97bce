"""Variance in practice: each agent's update gradient over repeated batches at fixed weights.

``verify`` computes the exact covariance of every estimator on small set-ups
(``docs/theory.md#estimators``); this measures the same thing where training happens: at
the weights of a checkpoint, an agent draws ``n`` independent rollout batches and computes
the gradient its update would take on each (its own collection, advantages, KL and loss,
through :meth:`~llm_mdp.agents.base.Agent.train_step`, with the optimizer step replaced by
a record of the policy's gradient, so the weights stay fixed). Agents normalise their
losses differently, so the figure of merit is scale-free: the relative variance
``tr Cov(g) / |E g|^2`` over the ``n`` batches, with ``E g`` their mean.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from llm_mdp.agents.base import Agent

__all__ = ["gradient_samples", "relative_variance"]


def gradient_samples(agent: Agent, n: int) -> torch.Tensor:
    """``(n, P)`` float64: the policy's update gradient on ``n`` fresh batches, unclipped,
    at ``agent``'s current weights (``agent`` itself is left untouched: a copy draws them).

    Each batch comes from a later update's random streams, so the batches are
    independent draws of the rollout distribution at these weights.
    """
    probe = copy.deepcopy(agent)
    probe.config.max_grad_norm = None
    probe.run_dir = None
    params = [p for p in probe.modules["policy"].parameters() if p.requires_grad]
    rows: list[torch.Tensor] = []
    first = [True]

    def record(*args: Any, **kwargs: Any) -> None:
        if first[0]:  # later epochs see the same weights and batch: the same gradient
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            rows.append(torch.cat([g.detach().double().flatten() for g in grads]))
            first[0] = False

    probe.optimizer.step = record  # type: ignore[method-assign]
    for _ in range(n):
        first[0] = True
        probe.train_step()
    return torch.stack(rows)


def relative_variance(samples: torch.Tensor) -> dict[str, float]:
    """``tr Cov / |E g|^2`` from ``(n, P)`` gradient samples, both estimated without
    bias: ``tr Cov`` with ``n - 1``, and ``|E g|^2 = |mean|^2 - tr Cov / n`` (the sample
    mean's own noise removed)."""
    n = len(samples)
    if n < 2:
        raise ValueError(f"samples has {n} rows; the variance needs at least 2")
    mean = samples.mean(0)
    trace = float(((samples - mean) ** 2).sum() / (n - 1))
    norm2 = float(mean.pow(2).sum()) - trace / n
    return {"relative_variance": trace / norm2, "trace_cov": trace, "mean_norm2": norm2}


def measure(
    tuning: dict[str, float],
    agents: dict[str, dict[str, Any]],
    *,
    task: str = "reverse",
    task_args: dict[str, Any] | None = None,
    checkpoints: tuple[int, ...] = (0, 40),
    batches: int = 16,
    num_envs: int = 64,
) -> dict[str, dict[str, float]]:
    """Relative gradient variance of each agent (``label -> {"agent", "config"}`` as in a
    study) at the weights of a GRPO run on ``task`` after each of ``checkpoints`` updates
    (seed 0, GRPO's tuned rate), each agent with its tuned rate; ``"<label>@<update>"``
    -> :func:`relative_variance`."""
    from llm_mdp.agents import get_agent
    from llm_mdp.envs import LLMTokenVectorEnv
    from llm_mdp.policies import CausalLMPolicy, tiny_gpt2

    env = LLMTokenVectorEnv(task, num_envs=num_envs, task_kwargs=task_args or {})
    policy = CausalLMPolicy(tiny_gpt2(env.vocab_size, seed=0), env.tokenizer, seed=0)
    grpo = get_agent("grpo")
    trainer = grpo(env, policy, grpo.config_class(learning_rate=tuning["grpo"], seed=0))
    out: dict[str, dict[str, float]] = {}
    for ck in sorted(checkpoints):
        trainer.learn(ck, progress=False)  # absolute target: continues to update ``ck``
        for label, a in agents.items():
            cls = get_agent(a["agent"])
            config = cls.config_class(seed=1, learning_rate=tuning[label], **a["config"])
            agent = cls(env, copy.deepcopy(policy), config)
            out[f"{label}@{ck}"] = relative_variance(gradient_samples(agent, batches))
    return out


def main() -> None:
    """``python -m llm_mdp.study.variance STUDY_DIR``: the main study's agents and tuned
    rates, on ``reverse`` at updates 0 and 40; prints a table, writes ``variance.json``."""
    import argparse
    import json
    from pathlib import Path

    from llm_mdp.study.spec import load_study

    p = argparse.ArgumentParser(prog="python -m llm_mdp.study.variance")
    p.add_argument("study_dir", type=Path, help="a finished main study (its tuning.json)")
    p.add_argument("--batches", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    spec, _ = load_study("main")
    tuning = json.loads((args.study_dir / "tuning.json").read_text())["learning_rates"]
    res = measure(tuning, spec.agents, task_args={"partial": True}, batches=args.batches)
    (args.study_dir / "variance.json").write_text(json.dumps(res, indent=1))
    for key, r in res.items():
        print(f"{key:<16} relative variance {r['relative_variance']:.3f}")


if __name__ == "__main__":
    main()
