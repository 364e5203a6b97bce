"""The chunked LM head's time: whole updates with dense logits against chunk sizes.

One agent per variant on the same model, task and batch (gpt2 4x256, vocab 50257, B 32,
R 32: the memory section's ``full`` size), one update of each in turn for ``--rounds``
rounds (the first left out), so load from other processes hits all alike; prints each
variant's median seconds per update and its ratio to the dense head (median of the
per-round ratios, min-max)::

    python benchmarks/lm_head.py                       # GRPO; chunks of 8, 16, 24, 32 MiB
    python benchmarks/lm_head.py --agent trepo --chunks-mib 24 --rounds 4

Peak memory is another matter (one process per agent): ``llm-mdp bench --only memory``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import llm_mdp.policies.lm_head as lm_head
from llm_mdp.agents import get_agent
from llm_mdp.bench.common import wide_env_model
from llm_mdp.policies import CausalLMPolicy


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--agent", default="grpo", help="grpo | ppo | trepo (default: grpo)")
    ap.add_argument("--chunks-mib", type=int, nargs="+", default=[8, 16, 24, 32])
    ap.add_argument("--rounds", type=int, default=5, help="updates per variant (first: warm-up)")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=32)
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error(f"--rounds={args.rounds}: expected at least 2 (the first is warm-up)")
    torch.set_num_threads(1)
    variants: dict[str, int | None] = {"dense": None}
    variants |= {f"{mib} MiB": mib << 18 for mib in args.chunks_mib}  # float32 logits
    agents = {}
    for label, elements in variants.items():
        env, model = wide_env_model(
            args.vocab, args.batch, args.length, (4, 256), n_prompts=64, reward="target"
        )
        policy = CausalLMPolicy(model, env.tokenizer, seed=0, chunked_head=elements is not None)
        cls = get_agent(args.agent)
        config = {"ppo": {"epochs": 1}, "trepo": {"kl_coef": 0.04}}.get(args.agent, {})
        agents[label] = cls(env, policy, cls.config_class.from_dict(config))
    default = lm_head.CHUNK_ELEMENTS
    seconds: dict[str, list[float]] = {label: [] for label in variants}
    for r in range(args.rounds):
        for label, agent in agents.items():
            lm_head.CHUNK_ELEMENTS = variants[label] or default
            t0 = time.perf_counter()
            agent.train_step()
            if r:
                seconds[label].append(time.perf_counter() - t0)
    lm_head.CHUNK_ELEMENTS = default
    rows = max(1, default // args.vocab)
    print(
        f"{args.agent}, vocab {args.vocab}, B {args.batch}, R {args.length} (default chunk: {rows} rows)"
    )
    for label, times in seconds.items():
        ratios = [t / d for t, d in zip(times, seconds["dense"], strict=True)]
        print(
            f"  {label:>7}: {statistics.median(times):.2f} s/update, "
            f"{statistics.median(ratios):.2f}x dense ({min(ratios):.2f}-{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
