"""TRePO's update cost against GRPO's, on the defaults of ``llm-mdp train``.

TRePO estimates prefix values with ``K`` Monte Carlo completions per anchor, so it
generates many more tokens than GRPO per update. This section times both agents'
updates on the same task, model and batch, interleaved (GRPO update, TRePO update,
GRPO update, ...) so that a noisy shared machine slows both alike, and reports the
median seconds per update, their ratio with its spread over the pairs, and what the
policy ran while acting: positions through full prefills (encoded) and rows through
one-token steps (decoded).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

TINY_LR = 2e-3  # the learning rate ``llm-mdp train`` uses for its tiny models


def tiny_agent(name: str, num_envs: int, seed: int, device: torch.device, **fields: Any) -> Any:
    """Agent ``name`` on ``llm-mdp train``'s defaults (tiny GPT-2, partial-credit
    ``reverse``, its learning rate), with config ``fields`` on top."""
    from llm_mdp.agents import get_agent
    from llm_mdp.envs import LLMTokenVectorEnv
    from llm_mdp.policies import CausalLMPolicy, tiny_gpt2
    from llm_mdp.tasks import make_task

    env = LLMTokenVectorEnv(make_task("reverse", partial=True), num_envs, device=device)
    model = tiny_gpt2(
        env.vocab_size, seed=seed, pad_token_id=env.pad_token_id, eos_token_id=env.eos_token_id
    )
    policy = CausalLMPolicy(
        model, env.tokenizer, vocab_size=env.vocab_size, seed=seed, device=device
    )
    cls = get_agent(name)
    return cls(env, policy, cls.config_class(seed=seed, learning_rate=TINY_LR, **fields))


def interleaved_updates(
    agents: dict[str, Any], steps: int, *, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[tuple[int, ...]]]]:
    """``steps`` rounds of one update per agent in turn (a noisy shared machine slows
    all alike); the first ``warmup`` rounds are not recorded.

    Returns:
        per agent, the seconds of each recorded update and its work
        ``(positions encoded, positions decoded, episodes)``.
    """
    seconds: dict[str, list[float]] = {name: [] for name in agents}
    work: dict[str, list[tuple[int, ...]]] = {name: [] for name in agents}
    for step in range(steps):
        for name, agent in agents.items():
            pol = agent.policy
            before = (pol.positions_encoded, pol.positions_decoded, agent.episodes)
            t0 = time.perf_counter()
            agent.train_step()
            dt = time.perf_counter() - t0
            after = (pol.positions_encoded, pol.positions_decoded, agent.episodes)
            if step >= warmup:
                seconds[name].append(dt)
                work[name].append(tuple(b - a for a, b in zip(before, after, strict=True)))
    return seconds, work


def bench_trepo_cost(
    *,
    num_envs: int,
    steps: int,
    device: torch.device,
    seed: int = 0,
    log: Any = print,
) -> dict[str, Any]:
    """``steps`` interleaved updates of GRPO and TRePO (the first pair is warm-up).

    Returns:
        settings, per-agent median seconds per update, positions encoded / decoded and
        episodes per update, the TRePO/GRPO time ratio (median of the per-pair ratios)
        with its min and max.
    """
    agents = {name: tiny_agent(name, num_envs, seed, device) for name in ("grpo", "trepo")}
    seconds, work = interleaved_updates(agents, steps, warmup=0 if steps == 1 else 1)
    ratios = [t / g for t, g in zip(seconds["trepo"], seconds["grpo"], strict=True)]
    out: dict[str, Any] = {
        "settings": {
            "task": "reverse (partial)",
            "model": "tiny-gpt2",
            "num_envs": num_envs,
            "steps": steps,
            "device": str(device),
        },
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
    for name in agents:
        enc, dec, eps = (statistics.median(w[i] for w in work[name]) for i in range(3))
        out[name] = {
            "step_s": statistics.median(seconds[name]),
            "encoded_per_update": enc,
            "decoded_per_update": dec,
            "episodes_per_update": eps,
        }
        log(
            f"  {name:<6} {out[name]['step_s']:.3f} s/update, {enc:,.0f} positions encoded, "
            f"{dec:,.0f} decoded, {eps:,.0f} episodes per update"
        )
    log(
        f"  TRePO/GRPO time {out['ratio']:.2f}x (pairs {out['ratio_min']:.2f}-{out['ratio_max']:.2f})"
    )
    return out
