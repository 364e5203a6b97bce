"""Multi-turn training: the environment talks back, the reward comes at the end.

Two tasks, one tiny GPT-2 each, trained by GRPO with groups of 8 (or ``--agent``):

* ``guess_number``: a hidden number in 0..7; after each guess the env appends ``<`` or
  ``>`` (tokens that are not actions) until the guess is right. Binary search is optimal
  (expected reward 19/32 = 0.594, against 0.071 for the uniform policy); the script
  prints the learned greedy game for every hidden number.
* ``rg:spell_backward`` (``pip install 'llm-mdp[reasoning-gym]'``): reasoning-gym's
  "spell this word backward" on 16 three-letter words, scored by reasoning-gym's own
  ``score_answer`` (per-letter credit).

It prints the reward curves (mean reward per tenth of the run) and writes one PNG per
task into the folder ``--out``. Default: about ten minutes on two shared cores.

    python examples/07_multi_turn.py                      # both tasks
    python examples/07_multi_turn.py --quick              # smoke run: 3 updates
    python examples/07_multi_turn.py --tasks guess_number --updates 400 --out runs/mt
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from llm_mdp.agents import AGENTS, rollout
from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.plotting import plot_learning_curve
from llm_mdp.policies import CausalLMPolicy, tiny_gpt2
from llm_mdp.tasks import Task, make_task

TASKS: dict[str, dict[str, Any]] = {
    "guess_number": {},
    "rg:spell_backward": {"size": 16, "seed": 0, "min_word_len": 3, "max_word_len": 3},
}
GROUP_AGENTS = ("rloo", "grpo", "trepo")  # need several responses per prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    parser.add_argument("--agent", default="grpo", choices=sorted(AGENTS))
    parser.add_argument("--updates", type=int, default=400, help="updates per task")
    parser.add_argument("--num-envs", type=int, default=32, help="episodes per update")
    parser.add_argument("--group-size", type=int, default=8, help="G of rloo, grpo, trepo")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/07_multi_turn"), help="PNG folder")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 updates, 8 envs")
    args = parser.parse_args()
    if args.quick:
        args.updates, args.num_envs, args.group_size = 3, 8, 4
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    args.out.mkdir(parents=True, exist_ok=True)

    for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        if name.startswith("rg:") and importlib.util.find_spec("reasoning_gym") is None:
            print(f"skipping {name}: pip install 'llm-mdp[reasoning-gym]'\n")
            continue
        task = make_task(name, **TASKS.get(name, {}))
        train(task, args)


def train(task: Task, args: argparse.Namespace) -> None:
    """Train a fresh tiny GPT-2 on ``task``; print its curve, write its PNG."""
    env = LLMTokenVectorEnv(task, args.num_envs)
    model = tiny_gpt2(
        env.vocab_size, seed=args.seed, pad_token_id=env.pad_token_id, eos_token_id=env.eos_token_id
    )
    policy = CausalLMPolicy(model, env.tokenizer, vocab_size=env.vocab_size, seed=args.seed)
    cls = AGENTS[args.agent]
    group = args.group_size if args.agent in GROUP_AGENTS else 1
    agent = cls(
        env, policy, cls.config_class(seed=args.seed, learning_rate=args.lr, group_size=group)
    )
    print(f"task {task.name!r}: {task.description}")
    print(
        f"  optimum {_fmt(task.optimal_reward)}, uniform policy {_fmt(task.random_reward)}, "
        f"greedy before training {agent.evaluate():.3f}"
    )
    start = time.perf_counter()
    history = agent.learn(args.updates, progress=False)
    seconds = time.perf_counter() - start
    k = max(1, len(history) // 10)
    curve = [
        sum(m["reward/mean"] for m in history[i : i + k]) / len(history[i : i + k])
        for i in range(0, len(history), k)
    ]
    print(f"  {args.agent}, {args.updates} updates x {args.num_envs} episodes, {seconds:.0f} s")
    print("  mean reward per tenth of the run: " + " ".join(f"{r:.3f}" for r in curve))
    print(f"  greedy after training {agent.evaluate():.3f}")
    if task.name == "guess_number":
        print("  greedy games (hidden number: guesses and the env's replies):")
        for n, game in enumerate(greedy_games(agent)):
            print(f"    {n}: {game}")
    slug = task.name.replace(":", "_")
    png = plot_learning_curve(
        history,
        args.out / f"{slug}.png",
        title=f"{args.agent} on {task.name}",
        optimum=task.optimal_reward,
    )
    print(f"  wrote {png}\n")


def greedy_games(agent: Any) -> list[str]:
    """The greedy conversation for every prompt of the pool, as text."""
    env = agent.env
    idx = list(range(len(env.task.prompts)))
    out: list[str] = []
    for lo in range(0, len(idx), env.num_envs):
        chunk = idx[lo : lo + env.num_envs]
        rollout(
            env,
            agent.policy,
            {"prompt_indices": chunk + [chunk[0]] * (env.num_envs - len(chunk))},
            greedy=True,
        )
        out += env.response_batch().responses[: len(chunk)]
    return out


def _fmt(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
