"""A study's figures: reward against generated tokens, and what each agent's budget cost."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llm_mdp.plotting import _pyplot, _save

__all__ = ["plot_costs", "plot_curves"]


def _panels(plt: Any, n: int) -> tuple[Any, list[Any]]:
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_curves(summary: dict[str, Any], path: str | Path, dpi: int = 110) -> Path:
    """One panel per task: mean training reward over seeds (line) and its 95% bootstrap
    interval (band) in windows of generated tokens, every rollout's tokens counted."""
    plt = _pyplot()
    tasks = list(summary["results"])
    fig, axes = _panels(plt, len(tasks))
    n_seeds = len(summary["seeds"])
    for ax, task in zip(axes, tasks, strict=True):
        for label, r in summary["results"][task].items():
            c = r["curve"]
            (line,) = ax.plot(c["tokens"], c["mean"], label=label, lw=1.5)
            ax.fill_between(c["tokens"], c["low"], c["high"], color=line.get_color(), alpha=0.15)
        ax.set_title(f"{task} ({n_seeds} seeds, 95% bootstrap band)")
        ax.set_xlabel("generated tokens (all rollouts)")
        ax.set_ylabel("mean training reward")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(plt, fig, path, dpi)


def plot_costs(summary: dict[str, Any], path: str | Path, dpi: int = 110) -> Path:
    """One panel per task: final reward (95% interval) against the wall seconds the token
    budget took, with forward-token positions per generated token in each label."""
    plt = _pyplot()
    tasks = list(summary["results"])
    fig, axes = _panels(plt, len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
        for label, r in summary["results"][task].items():
            sec = summary["timing"][task][label]["seconds"]
            lo, hi = r["final_ci"]
            ax.errorbar(
                [sec],
                [r["final"]],
                yerr=[[r["final"] - lo], [hi - r["final"]]],
                fmt="o",
                capsize=3,
                label=f"{label} ({r['forward_per_generated']:.0f} fwd/gen)",
            )
        ax.set_title(f"{task}: final reward at equal generated tokens")
        ax.set_xlabel("wall seconds per run (1 thread)")
        ax.set_ylabel("final reward")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path, dpi)
