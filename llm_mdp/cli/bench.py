"""``llm-mdp bench``: the options and the runner live in :mod:`llm_mdp.bench.cli`."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llm_mdp.bench.cli import add_arguments as add

    add(p)


def cmd_bench(args: argparse.Namespace) -> int:
    from llm_mdp.bench.cli import run_cli

    argv = list(args.argv)
    return int(run_cli(args, argv[argv.index("bench") + 1 :]))
