"""Figures a person would rather look at than read: learning curves and comparisons."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol


class BiasVarianceRow(Protocol):
    """What :func:`plot_bias_variance` reads of a row (:class:`~llm_mdp.theory.EstimatorRow`)."""

    @property
    def section(self) -> str: ...
    @property
    def estimator(self) -> str: ...
    @property
    def relative_error(self) -> float: ...
    @property
    def trace_cov_per_response(self) -> float: ...


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


def plot_bias_variance(rows: Sequence[BiasVarianceRow], path: str | Path) -> Path:
    """Save a PNG: relative bias ``|E g - grad J| / |grad J|`` against ``tr Cov`` per response.

    One labelled point per estimator row (``llm-mdp verify``'s rows); the y axis
    is linear below ``1e-4`` so the unbiased estimators (bias ~1e-16) sit on the zero
    line, the x axis logarithmic. Labels are nudged apart so that they stay readable.
    """
    plt = _pyplot()
    items = list(rows)
    colors = {"per-token": "tab:blue", "group": "tab:orange", "trepo": "tab:green",
              "aggregation": "tab:purple", "registry": "tab:gray"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(12, 7.5))
    points = []
    seen: set[str] = set()
    for r in items:
        x = max(r.trace_cov_per_response, 1e-12)
        y = r.relative_error if math.isfinite(r.relative_error) else 0.0
        c = colors.get(r.section, "black")
        ax.scatter(x, y, color=c, s=28, label=None if r.section in seen else r.section, zorder=3)
        seen.add(r.section)
        points.append((x, y, r.estimator))
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_ylim(-2e-5, 3.0)
    ax.autoscale_view()
    fig.canvas.draw()
    placed: list[tuple[float, float, float, float]] = []
    for x, y, text in sorted(points, key=lambda p: (p[1], p[0])):
        px, py = ax.transData.transform((x, y))
        w, h = 5.8 * len(text), 10.0
        dy = 4.0
        while any(
            px + 4 < bx + bw and bx < px + 4 + w and py + dy < by + bh and by < py + dy + h
            for bx, by, bw, bh in placed
        ):
            dy += h
        placed.append((px + 4, py + dy, w, h))
        ax.annotate(text, (x, y), fontsize=7, xytext=(4, dy * 72 / fig.dpi),
                    textcoords="offset points",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6"} if dy > 4 else None)  # fmt: skip
    ax.set_xlabel("trace of the covariance of the gradient, per response (log)")
    ax.set_ylabel("relative bias |E g - grad J| / |grad J| (linear below 1e-4)")
    ax.set_title("Policy-gradient estimators: exact bias vs variance")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
