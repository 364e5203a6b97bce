"""PPO's critic set-ups against the agents that need none, on ``llm-mdp train``'s defaults.

"TRePO needs no critic" (arXiv 2506.02553, ``docs/theory.md#trepo``) is a claim about
cost at equal learning. This section trains GRPO, TRePO and PPO with each critic option
(``copy``: a second trunk; ``shared``: a value head on the policy's trunk; ``small``:
half the layers) on the same task, model, batch and seed, one update of each in turn
(so a noisy shared machine slows all alike), and reports per set-up the median seconds
per update, the mean batch reward of the last updates and the greedy reward after the
``updates``. Peak memory of the same set-ups is the memory section's ``critics`` variant
(each in a fresh process).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from llm_mdp.bench.trepo_cost import tiny_agent

SETUPS: dict[str, tuple[str, dict[str, Any]]] = {
    "grpo": ("grpo", {}),
    "trepo": ("trepo", {}),
    "ppo-copy": ("ppo", {"critic": "copy"}),
    "ppo-shared": ("ppo", {"critic": "shared"}),
    "ppo-small": ("ppo", {"critic": "small"}),
}
"""Label -> (agent, config fields besides seed and learning rate)."""


def bench_critics(
    *,
    num_envs: int,
    updates: int,
    device: torch.device,
    seed: int = 0,
    last: int = 5,
    log: Any = print,
) -> dict[str, Any]:
    """``updates`` updates of every set-up in :data:`SETUPS`, interleaved.

    Returns:
        settings and, per label, ``step_s`` (median seconds per update, the first update
        left out), ``final_batch_reward`` (mean batch reward of the ``last`` updates),
        ``greedy_reward`` (greedy answers to every prompt after training), the initial
        greedy reward, trainable parameters and episodes per update.
    """
    agents = {
        label: tiny_agent(name, num_envs, seed, device, **fields)
        for label, (name, fields) in SETUPS.items()
    }
    initial = {label: a.evaluate(greedy=True) for label, a in agents.items()}
    seconds: dict[str, list[float]] = {label: [] for label in agents}
    rewards: dict[str, list[float]] = {label: [] for label in agents}
    for step in range(updates):
        for label, agent in agents.items():
            t0 = time.perf_counter()
            m = agent.train_step()
            dt = time.perf_counter() - t0
            rewards[label].append(m["reward/mean"])
            if step > 0 or updates == 1:
                seconds[label].append(dt)
    out: dict[str, Any] = {
        "settings": {
            "task": "reverse (partial)",
            "model": "tiny-gpt2",
            "num_envs": num_envs,
            "updates": updates,
            "seed": seed,
            "device": str(device),
        },
        "setups": {},
    }
    grpo_s = statistics.median(seconds["grpo"])
    for label, agent in agents.items():
        n_params = sum(
            p.numel() for m in agent.modules.values() for p in m.parameters() if p.requires_grad
        )
        r = {
            "step_s": statistics.median(seconds[label]),
            "time_over_grpo": statistics.median(seconds[label]) / grpo_s,
            "final_batch_reward": statistics.fmean(rewards[label][-last:]),
            "greedy_reward": agent.evaluate(greedy=True),
            "initial_greedy_reward": initial[label],
            "trainable_params": n_params,
            "episodes_per_update": agent.episodes / max(agent.update, 1),
        }
        out["setups"][label] = r
        log(
            f"  {label:<10} {r['step_s']:.3f} s/update ({r['time_over_grpo']:.2f}x GRPO), "
            f"batch reward {r['final_batch_reward']:.3f} over the last {last}, greedy "
            f"{r['initial_greedy_reward']:.3f} -> {r['greedy_reward']:.3f}, "
            f"{n_params:,} trainable parameters"
        )
    return out
