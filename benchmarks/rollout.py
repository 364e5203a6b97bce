"""Rollout throughput: our KV-cached env + ``policy.act`` loop vs ``model.generate``.

The code lives in :mod:`llm_mdp.bench.rollout` (``llm-mdp bench --only rollout`` runs
the budgeted grid); this script runs any grid you ask for::

    python benchmarks/rollout.py                                  # vocab 256, 50257; batch 16, 64, 256
    python benchmarks/rollout.py --vocab 50257 --batch 64 --repeats 3 --device auto
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from llm_mdp.bench.rollout import bench_rollout, format_rollout
from llm_mdp.utils import resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vocab", type=int, nargs="+", default=[256, 50257])
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"new_tokens={args.new_tokens} gpt2 {args.n_layer}x{args.n_embd}"
    )
    rows = bench_rollout(
        tuple(args.vocab),
        tuple(args.batch),
        new_tokens=args.new_tokens,
        model_size=(args.n_layer, args.n_embd),
        device=device,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    print()
    print(format_rollout(rows))


if __name__ == "__main__":
    main()
