"""All six agents on one task with the same budget, in one plot.

Every agent trains a fresh tiny GPT-2 (same seed, same initial weights) for the same
number of updates of the same number of episodes (``--num-envs``), on the same task.
The plot's left panel is reward per update; the right panel charges each agent for
every episode it generated (ReMax's greedy baselines and TRePO's Monte Carlo value
rollouts included), the fair compute axis. Each agent keeps its own paper's other
defaults (PPO, for one, takes several epochs per batch). Default: about 45 s on one core.

    python examples/03_compare_agents.py                       # reverse (partial credit)
    python examples/03_compare_agents.py --quick               # smoke run: 3 updates
    python examples/03_compare_agents.py --task target_token --updates 40
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from llm_mdp.agents import AGENTS
from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.plotting import plot_comparison
from llm_mdp.policies import CausalLMPolicy, tiny_gpt2
from llm_mdp.tasks import make_task

GROUP_AGENTS = ("rloo", "grpo", "trepo")  # need several responses per prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="reverse", help="built-in task (default: reverse)")
    parser.add_argument("--agents", default=",".join(AGENTS), help="comma-separated agents")
    parser.add_argument("--updates", type=int, default=200, help="updates per agent")
    parser.add_argument("--num-envs", type=int, default=32, help="episodes per update")
    parser.add_argument("--group-size", type=int, default=4, help="G of rloo, grpo, trepo")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/03_compare_agents.png"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 updates, 8 envs")
    args = parser.parse_args()
    if args.quick:
        args.updates, args.num_envs = 3, 8
    torch.set_num_threads(1)  # tiny models: one thread is fastest

    task_kwargs = {"partial": True} if args.task == "reverse" else {}
    task = make_task(args.task, **task_kwargs)
    print(f"task {task.name!r}: {task.description} (optimum {task.optimal_reward})")
    print(f"budget: {args.updates} updates x {args.num_envs} episodes per agent\n")

    runs: dict[str, list[dict[str, float]]] = {}
    print(
        f"{'agent':<10} {'reward(first)':>13} {'reward(last 10%)':>16} {'greedy':>7} "
        f"{'episodes':>9} {'seconds':>8}"
    )
    for name in [a.strip() for a in args.agents.split(",") if a.strip()]:
        cls = AGENTS[name]
        env = LLMTokenVectorEnv(task, args.num_envs)
        model = tiny_gpt2(
            env.vocab_size,
            seed=args.seed,  # identical initial weights for every agent
            pad_token_id=env.pad_token_id,
            eos_token_id=env.eos_token_id,
        )
        policy = CausalLMPolicy(model, env.tokenizer, vocab_size=env.vocab_size, seed=args.seed)
        config = cls.config_class(
            seed=args.seed,
            learning_rate=args.lr,
            group_size=args.group_size if name in GROUP_AGENTS else 1,
        )
        agent = cls(env, policy, config)
        start = time.perf_counter()
        history = agent.learn(args.updates, progress=False)
        seconds = time.perf_counter() - start
        runs[name] = history
        k = max(1, len(history) // 10)
        last = sum(m["reward/mean"] for m in history[-k:]) / k
        print(
            f"{name:<10} {history[0]['reward/mean']:>13.3f} {last:>16.3f} "
            f"{agent.evaluate():>7.3f} {agent.episodes:>9d} {seconds:>8.1f}"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = plot_comparison(
        runs,
        args.out,
        title=f"{task.name}: {args.updates} updates of {args.num_envs} episodes each",
        optimum=task.optimal_reward,
    )
    print(f"\nwrote {png}")


if __name__ == "__main__":
    main()
