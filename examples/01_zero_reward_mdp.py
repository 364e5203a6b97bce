"""Text generation as an MDP, one step at a time: zero rewards, then RM(W) at the end.

The ``hidden_rewards`` task is the set-up of the paper's Theorem 1. Every token w_t
taken in state s_t has a true reward r(s_t, w_t), but the learner never sees it: under
the Zero-Reward Assumption each step pays 0.0 and only the finished response W is paid

    RM(W) = sum_t gamma^(t-1) r(s_t, w_t).

This script plays a few episodes with random tokens and prints, at every step, the state
(prompt | response so far), the action, the reward the env pays, and the hidden token
reward. At the end it checks RM(W) against the discounted sum. Runs in about a second.

    python examples/01_zero_reward_mdp.py
    python examples/01_zero_reward_mdp.py --gamma 0.5 --episodes 5
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np

import llm_mdp  # noqa: F401  (importing it registers the "llm_mdp/..." env ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=3, help="episodes to play")
    parser.add_argument("--gamma", type=float, default=0.9, help="discount of RM(W)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="one episode")
    args = parser.parse_args()
    if args.quick:
        args.episodes = 1

    # Vocabulary: <eos> (also the pad token), 'a', 'b'; every id is an action.
    # Responses of at most 4 tokens.
    env = gym.make("llm_mdp/HiddenRewards-v0", task_kwargs={"gamma": args.gamma})
    task = env.unwrapped.task
    tok = env.unwrapped.tokenizer
    P = env.unwrapped.P  # observation columns [0, P) hold the prompt, [P, W) the response
    hidden_r = task.metadata["token_reward"]  # r(prompt, prefix, token): the learner can't see it
    rng = np.random.default_rng(args.seed)
    print(f"task: {task.description}")
    print(
        f"actions: {tok.convert_ids_to_tokens(list(range(env.action_space.n)))}, gamma = {args.gamma}"
    )
    print(
        f"best RM(W) over all responses (dynamic programming on the tree): {task.optimal_reward:.4f}\n"
    )

    for episode in range(args.episodes):
        obs, info = env.reset(seed=args.seed + episode)
        total, t, done = 0.0, 0, False
        print(f"episode {episode}")
        print(
            f"  {'t':>2}  {'state s_t':<14} {'action w_t':<11} {'env reward':>10} {'hidden r_t':>11}"
        )
        while not done:
            t += 1
            # the state: the real tokens of the observation (the mask marks them)
            ids = obs["input_ids"][obs["attention_mask"] == 1].tolist()
            n_prompt = int(obs["attention_mask"][:P].sum())
            prompt, prefix = tuple(ids[:n_prompt]), tuple(ids[n_prompt:])
            # a random token: <eos> (ends the response) with probability 0.2, else 'a' or 'b'
            eos, a, b = tok.convert_tokens_to_ids(["<eos>", "a", "b"])
            action = int(rng.choice([eos, a, b], p=[0.2, 0.4, 0.4]))
            r_t = hidden_r(prompt, prefix, action)  # what a token-level reward would pay
            obs, reward, terminated, truncated, info = env.step(action)
            total += reward
            done = terminated or truncated
            state = f"{tok.decode(prompt)!r} | {tok.decode(prefix)!r}"
            word = tok.convert_ids_to_tokens(action)
            print(f"  {t:>2}  {state:<14} {word!r:<11} {reward:>10.4f} {r_t:>11.4f}")

        # the env reports the hidden rewards once the episode is over
        r = np.asarray(info["token_rewards"])
        discounted = float(sum(args.gamma**i * x for i, x in enumerate(r)))
        print(
            f"  response {info['response']!r}: the env paid 0.0 until the last step, then {total:.4f}"
        )
        print(
            f"  sum_t gamma^(t-1) r_t = {discounted:.4f}  ->  equal: {np.isclose(total, discounted)}\n"
        )
        assert np.isclose(total, discounted), "RM(W) must equal the discounted token rewards"


if __name__ == "__main__":
    main()
