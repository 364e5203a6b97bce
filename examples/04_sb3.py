"""stable-baselines3 PPO trains a tiny transformer on a built-in task (CPU, about a minute).

The token env goes to SB3 as a ``VecEnv`` (``make_sb3_env``: one batched env, SB3's
``terminal_observation`` / ``TimeLimit.truncated`` conventions, ``VecMonitor`` for episode
statistics) and the policy is a Hugging Face causal LM (``LMActorCriticPolicy``: action
logits from the LM head at the last real token, a value head on its last hidden state).
SB3's own ``PPO`` runs unchanged.

    python examples/04_sb3.py                    # reverse (partial credit), 40k steps
    python examples/04_sb3.py --steps 2000       # a quick smoke run
    python examples/04_sb3.py --task target_token --steps 8000
    python examples/04_sb3.py --policy mlp       # SB3's MultiInputPolicy for comparison

Needs ``pip install 'llm-mdp[sb3]'`` (stable-baselines3, and tqdm + rich for SB3's
progress bar).
"""

from __future__ import annotations

import argparse
import functools
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.evaluation import evaluate_policy

from llm_mdp.policies import tiny_gpt2
from llm_mdp.sb3 import LMActorCriticPolicy, make_sb3_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="reverse", help="built-in task name")
    parser.add_argument("--steps", type=int, default=40_000, help="env steps (tokens) to train")
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--policy", choices=["lm", "mlp"], default="lm")
    parser.add_argument("--eval-episodes", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    torch.set_num_threads(1)

    task_kwargs = {"partial": True} if args.task == "reverse" else {}
    env = make_sb3_env(args.task, num_envs=args.num_envs, task_kwargs=task_kwargs)
    task = env.get_attr("task")[0]
    if args.policy == "lm":
        # a zero-argument factory: SB3 builds the policy itself (and pickles policy_kwargs
        # on save), so pass the recipe, not the weights
        factory = functools.partial(tiny_gpt2, task.vocab_size, n_layer=2, n_embd=64, seed=0)
        policy: type[LMActorCriticPolicy] | str = LMActorCriticPolicy
        policy_kwargs = {"model": factory}
    else:
        policy, policy_kwargs = "MultiInputPolicy", {}
    model = PPO(
        policy,
        env,
        n_steps=32,
        batch_size=128,
        n_epochs=4,
        learning_rate=1e-3,
        ent_coef=0.0,
        policy_kwargs=policy_kwargs,
        seed=args.seed,
        verbose=0,
    )
    n_params = sum(p.numel() for p in model.policy.parameters())
    print(f"task {task.name!r}: {task.description}; vocabulary {task.vocab_size}")
    print(f"policy {args.policy}: {n_params:,} parameters")

    def mean_reward() -> float:  # stochastic policy, whole episodes
        mean, _ = evaluate_policy(
            model, env, n_eval_episodes=args.eval_episodes, deterministic=False
        )
        return float(mean)

    before = mean_reward()
    start = time.perf_counter()
    model.learn(total_timesteps=args.steps, progress_bar=not args.no_progress)  # SB3's bar
    seconds = time.perf_counter() - start
    after = mean_reward()
    print(f"mean episode reward before: {before:.3f}")
    print(f"mean episode reward after:  {after:.3f}  ({args.steps} steps in {seconds:.1f} s)")
    if task.optimal_reward is not None:
        print(f"optimum: {task.optimal_reward:.3f}")


if __name__ == "__main__":
    main()
