"""``llm-mdp episode``: walk one episode, state, action and reward at every step.

Every reward before the last is zero and the last is ``RM(W)``: the Zero-Reward
Assumption made visible (``docs/theory.md#the-token-mdp``).
"""

from __future__ import annotations

import argparse

from llm_mdp.cli.options import CLIError, resolve_options


def cmd_episode(args: argparse.Namespace) -> int:
    """Print one episode of the task, acted by a fresh or a checkpointed policy."""
    import torch

    from llm_mdp.agents import CheckpointError
    from llm_mdp.agents.checkpoint import read_checkpoint
    from llm_mdp.cli.build import build
    from llm_mdp.envs import LLMTokenEnv

    opts = resolve_options(args)
    opts["num_envs"] = 1
    opts["agent_config"] = {}  # the agent plays no part; its group size must not refuse B = 1
    opts["agent"] = "reinforce"
    state = None
    if args.checkpoint is not None:
        try:
            state = read_checkpoint(args.checkpoint)
        except CheckpointError as exc:
            raise CLIError(str(exc)) from None
    env_vec, policy, _, _ = build(opts)
    if state is not None:
        if state.get("task", env_vec.task.name) != env_vec.task.name:
            raise CLIError(
                f"checkpoint {str(args.checkpoint)!r} is for task {state['task']!r}, not "
                f"{env_vec.task.name!r} (pass --task {state['task']})"
            )
        try:
            policy.load_state_dict(state["modules"]["policy"])
        except (KeyError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise CLIError(
                f"checkpoint {str(args.checkpoint)!r} does not fit --model {opts['model']}: {first}"
            ) from None
    env = LLMTokenEnv(env_vec.task, max_response_tokens=env_vec.R)
    tok = env.tokenizer
    reset_opts = {"prompt": args.prompt} if args.prompt is not None else None
    try:
        obs, info = env.reset(seed=opts["seed"], options=reset_opts)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    P = env.P
    cache = None
    total, t, done = 0.0, 0, False
    print(f"task {env.task.name!r}: {env.task.description}")
    print(
        f"{'t':>3}  {'state s_t (prompt | response so far)':<40} {'action w_t':<12} "
        f"{'reward r_t':>10}  done"
    )
    while not done:
        t += 1
        ids = obs["input_ids"][obs["attention_mask"].astype(bool)].tolist()
        n_prompt = int(obs["attention_mask"][:P].sum())
        text = f"{tok.decode(ids[:n_prompt])!r} | {tok.decode(ids[n_prompt:])!r}"
        o = {k: torch.as_tensor(v).unsqueeze(0) for k, v in obs.items()}
        action, _, cache = policy.act(o, cache, greedy=args.greedy)
        a = int(action[0])
        obs, r, term, trunc, info = env.step(a)
        total += r
        done = term or trunc
        flag = "terminated" if term else "truncated" if trunc else ""
        print(f"{t:>3}  {text:<40} {tok.convert_ids_to_tokens(a)!r:<12} {r:>10.4f}  {flag}")
    print(
        f"response {info['response']!r}: every reward before the last is 0.0; "
        f"the sum is RM(W) = {total:.4f}"
    )
    if "token_rewards" in info:
        g = env.task.gamma
        tr = info["token_rewards"][:t]  # fixed length R in info: the episode's T = t steps
        s = sum(g**i * x for i, x in enumerate(tr))
        print(
            f"hidden token rewards r_t = {[round(float(x), 4) for x in tr]}; "
            f"sum_t gamma^(t-1) r_t = {s:.4f} (gamma = {g})"
        )
    return 0
