"""``llm-mdp study``: a grid of agents x tasks x seeds at equal generated-token budgets.

A study is a TOML file (format: :mod:`llm_mdp.study.spec`) or the name of a built-in
one. Runs go to ``--out`` (default ``studies/<name>``); running the same command again
continues a study that was stopped, without redoing finished runs.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from llm_mdp.cli.options import CLIError, number_type
from llm_mdp.validation import Range


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "study",
        nargs="?",
        help="a built-in study (see --list) or a study TOML file",
    )
    p.add_argument("--list", action="store_true", help="list the built-in studies and exit")
    p.add_argument("--out", type=Path, help="study folder (default: studies/<name>)")
    p.add_argument(
        "--jobs",
        type=number_type(int, Range(1)),
        default=1,
        help="runs at a time, one process each with the study's torch threads (default: 1)",
    )
    p.add_argument(
        "--max-runs",
        type=number_type(int, Range(0)),
        help="start at most this many runs now, then stop (run again to continue)",
    )
    p.add_argument(
        "--budget",
        type=number_type(int, Range(1)),
        help="override the study's generated-token budget per run (default folder: "
        "studies/<name>-<budget>)",
    )
    p.add_argument("--overwrite", action="store_true", help="delete the study folder's runs first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_study(args: argparse.Namespace) -> int:
    """List the built-in studies, or run (continue) one and print its table."""
    from llm_mdp.study import StudyError, builtin_studies, load_study, run_study
    from llm_mdp.study.report import format_table

    if args.list:
        for name, path in sorted(builtin_studies().items()):
            try:
                spec, _ = load_study(path)
            except StudyError as exc:
                raise CLIError(str(exc)) from None
            runs = len(spec.agents) * len(spec.tasks) * len(spec.seeds) + len(spec.tune_runs())
            print(f"{name:<10} {runs:>4} runs  {spec.description}")
        return 0
    if args.study is None:
        raise CLIError("give a study (a built-in name or a TOML file); --list shows them")
    try:
        spec, _ = load_study(args.study)
    except StudyError as exc:
        raise CLIError(str(exc)) from None
    if args.budget is not None:
        spec.budget = args.budget
    name = spec.name if args.budget is None else f"{spec.name}-{args.budget}"
    out = args.out or Path("studies") / name
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a file; expected a folder")
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    try:
        summary = run_study(
            spec, out, jobs=args.jobs, max_runs=args.max_runs, progress=not args.no_progress
        )
    except StudyError as exc:
        raise CLIError(str(exc)) from None
    if summary is None:
        print(f"stopped after --max-runs {args.max_runs}; run the same command to continue")
        return 0
    print(format_table(summary))
    for task, text in summary["statements"].items():
        print(f"{task}: {text}")
    return 0
