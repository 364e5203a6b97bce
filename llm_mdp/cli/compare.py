"""``llm-mdp compare``: several agents on one task with the same budget, one plot.

Each agent trains into ``<run dir>/<agent>/`` (a run folder like ``train``'s, without
its greedy samples). Every agent's options are checked before the first one trains.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from llm_mdp.cli.options import (
    CLIError,
    check_writable_dir,
    clear_run,
    held_run_files,
    resolve_options,
)


def cmd_compare(args: argparse.Namespace) -> int:
    """Train every agent of ``--agents`` in turn; print a table, write ``compare.png``."""
    from llm_mdp.agents import AGENTS
    from llm_mdp.cli.build import agent_config, check

    names = [a.strip() for a in args.agents.split(",") if a.strip()]
    if not names:
        raise CLIError(f"--agents {args.agents!r}: expected comma-separated agent names")
    for a in names:
        if a not in AGENTS:
            raise CLIError(f"unknown agent {a!r}; known agents: {', '.join(AGENTS)}")
    opts = resolve_options(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(opts["run_dir"] or f"runs/{stamp}-compare-{opts['task']}")
    check_writable_dir(out, "--run-dir")
    held = [f"{n}/{f}" for n in names for f in held_run_files(out / n)]
    if held and not args.overwrite:
        raise CLIError(
            f"--run-dir {str(out)!r} already holds runs ({', '.join(held)}); replace them "
            "with --overwrite or choose another folder"
        )
    per_agent = [dict(opts, agent=n, agent_config=dict(opts["agent_config"])) for n in names]
    check(per_agent[0])
    for o in per_agent[1:]:
        agent_config(o)
    runs: dict[str, list[dict[str, float]]] = {}
    summary: list[tuple[str, float, float, int, float]] = []
    optimum: float | None = None
    for o in per_agent:
        summary.append(_train_one(o, out, runs, progress=not args.no_progress))
        optimum = o["optimum"]
    from llm_mdp.plotting import plot_comparison

    png = plot_comparison(
        runs,
        out / "compare.png",
        title=f"{opts['task']}: equal updates of {opts['num_envs']} episodes",
        optimum=optimum,
    )
    print(f"{'agent':<10} {'reward(last 10%)':>16} {'greedy':>8} {'episodes':>9} {'seconds':>8}")
    for name, r, g, e, s in summary:
        print(f"{name:<10} {r:>16.3f} {g:>8.3f} {e:>9d} {s:>8.1f}")
    print(f"wrote {png}")
    return 0


def _train_one(
    o: dict[str, Any], out: Path, runs: dict[str, list[dict[str, float]]], *, progress: bool
) -> tuple[str, float, float, int, float]:
    from llm_mdp.agents.logger import read_metrics
    from llm_mdp.cli.build import build

    name = o["agent"]
    env, policy, cls, config = build(o)
    o["optimum"] = env.task.optimal_reward
    clear_run(out / name)
    agent = cls(env, policy, config, run_dir=out / name)
    t0 = time.perf_counter()
    agent.learn(o["updates"], total_tokens=o["tokens"], progress=progress)
    runs[name] = read_metrics(out / name / "metrics.csv")
    k = max(1, len(runs[name]) // 10)
    last = sum(r["reward/mean"] for r in runs[name][-k:]) / k
    return name, last, agent.evaluate(), agent.episodes, time.perf_counter() - t0
