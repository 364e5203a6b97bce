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


def _save(plt: Any, fig: Any, path: str | Path, dpi: int) -> Path:
    """Lay out, write ``path`` (creating its folder) and close ``fig``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


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
    return _save(plt, fig, path, dpi=120)


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
    return _save(plt, fig, path, dpi=120)


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
    return _save(plt, fig, path, dpi=110)


def plot_tree(
    parents: Sequence[int],
    labels: Sequence[str],
    edges: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    leaf_color: Sequence[bool] | None = None,
) -> Path:
    """Draw a rooted tree left to right: node ``i`` has parent ``parents[i]`` (-1: root).

    ``labels[i]`` is written in the node's box, ``edges[i]`` on the edge from its parent;
    leaves are spread evenly, an inner node sits at the mean height of its children.
    ``leaf_color[i]`` marks nodes drawn in the terminal colour.
    """
    plt = _pyplot()
    n = len(parents)
    children: list[list[int]] = [[] for _ in range(n)]
    for i, p in enumerate(parents):
        if p >= 0:
            children[p].append(i)
    depth = [0] * n
    for i in range(n):  # parents come before their children
        depth[i] = depth[parents[i]] + 1 if parents[i] >= 0 else 0
    y = [0.0] * n
    leaves = 0

    def place(i: int) -> float:
        nonlocal leaves
        if not children[i]:
            y[i] = -float(leaves)
            leaves += 1
        else:
            y[i] = sum(place(c) for c in children[i]) / len(children[i])
        return y[i]

    for root in (i for i in range(n) if parents[i] < 0):
        place(root)
    fig, ax = plt.subplots(figsize=(2.4 * (max(depth) + 1), 0.42 * leaves + 1.0))
    for i, p in enumerate(parents):
        if p >= 0:
            ax.plot([depth[p], depth[i]], [y[p], y[i]], color="0.6", lw=0.8, zorder=1)
            ax.text((depth[p] + depth[i]) / 2, (y[p] + y[i]) / 2, edges[i], fontsize=7,
                    ha="center", va="bottom", color="0.25")  # fmt: skip
    for i in range(n):
        terminal = bool(leaf_color[i]) if leaf_color is not None else not children[i]
        ax.text(depth[i], y[i], labels[i], fontsize=7.5, ha="center", va="center", zorder=2,
                bbox={"boxstyle": "round,pad=0.25", "lw": 0.6,
                      "fc": "#fde9c9" if terminal else "#dbe9f6"})  # fmt: skip
    ax.set_xlim(-0.6, max(depth) + 0.6)
    ax.set_ylim(-leaves + 0.4, 0.8)
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    return _save(plt, fig, path, dpi=120)


def plot_token_weights(
    tokens: Sequence[str],
    weights: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Grouped bars: for each token of one response, the weight each estimator gives it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2.4 + 1.5 * len(tokens), 4.6))
    k = len(weights)
    width = 0.8 / max(k, 1)
    for j, (name, ws) in enumerate(weights.items()):
        xs = [t + (j - (k - 1) / 2) * width for t in range(len(tokens))]
        ax.bar(xs, list(ws), width=width, label=name)
    ax.axhline(0.0, color="0.3", lw=0.8)
    ax.set_xticks(range(len(tokens)), [f"t={t + 1}\n{tok}" for t, tok in enumerate(tokens)])
    ax.set_ylabel("weight of grad log pi(w_t | s_t)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(plt, fig, path, dpi=120)
