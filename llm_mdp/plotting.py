"""Figures a person would rather look at than read: learning curves and comparisons."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - matplotlib ships with the dev/plot extras
        raise ImportError("plots need matplotlib: pip install 'llm-mdp[plot]'") from exc
    return plt


def _smooth(ys: Sequence[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_learning_curve(
    rows: Sequence[Mapping[str, float]],
    path: str | Path,
    *,
    title: str = "",
    optimum: float | None = None,
) -> Path:
    """Mean reward per update (raw and moving average), KL and response length."""
    plt = _pyplot()
    x = [r["update"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    ys = [r["reward/mean"] for r in rows]
    ax.plot(x, ys, alpha=0.35, label="batch mean")
    ax.plot(x, _smooth(ys, max(1, len(ys) // 20)), label="moving average")
    if optimum is not None:
        ax.axhline(optimum, color="gray", ls="--", lw=1, label="optimum")
    ax.set(xlabel="update", ylabel="reward", title=title or "reward")
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[1]
    ax.plot(x, [r["response/length"] for r in rows], label="response length")
    ax.set(xlabel="update", ylabel="tokens")
    if any("kl/ref" in r for r in rows):
        ax2 = ax.twinx()
        ax2.plot(x, [r.get("kl/ref", float("nan")) for r in rows], color="C3", label="KL to ref")
        ax2.set_ylabel("KL(pi || ref) per sequence", color="C3")
    ax.set_title("response length" + (" and KL" if any("kl/ref" in r for r in rows) else ""))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_comparison(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path,
    *,
    title: str = "",
    optimum: float | None = None,
) -> Path:
    """Reward of several agents against updates and against episodes generated.

    The second panel charges every agent for all the episodes it sampled (TRePO's value
    rollouts and ReMax's greedy rollouts included), the fair compute axis.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for name, rows in runs.items():
        ys = _smooth([r["reward/mean"] for r in rows], max(1, len(rows) // 20))
        axes[0].plot([r["update"] for r in rows], ys, label=name)
        axes[1].plot([r["episodes"] for r in rows], ys, label=name)
    for ax, xl in zip(axes, ("update", "episodes generated (log)"), strict=True):
        if optimum is not None:
            ax.axhline(optimum, color="gray", ls="--", lw=1)
        ax.set_xlabel(xl)
    axes[1].set_xscale("log")
    axes[0].set_ylabel("mean reward (moving average)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
