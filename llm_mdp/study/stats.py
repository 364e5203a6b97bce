"""Statistics over seeds: token-weighted curves, bootstrap intervals, permutation tests.

Every random draw comes from a ``numpy`` generator seeded by the caller, so a summary is
a pure function of the runs it summarises.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np

Floats: TypeAlias = Sequence[float] | np.ndarray

__all__ = ["bootstrap_ci", "holm", "permutation_test", "window_means"]


def window_means(ends: Floats, values: Floats, edges: Floats) -> np.ndarray:
    """Token-weighted means of a step function over consecutive windows.

    Update ``i`` generated the tokens ``(ends[i-1], ends[i]]`` (``ends[-1] = 0`` before
    the first) and its mean reward ``values[i]`` stands for each of them. The result's
    entry ``j`` is the mean over ``(edges[j], edges[j+1]]``; a window past the last
    update takes the last value (a run stops at the first update that reaches its
    budget, so its windows up to the budget are covered).

    Args:
        ends: ``(n,)`` increasing cumulative token counts after each update.
        values: ``(n,)`` each update's value.
        edges: ``(k + 1,)`` increasing window edges.

    Returns:
        ``(k,)`` float64 means.
    """
    e = np.asarray(ends, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    x = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.shape != v.shape or len(e) == 0:
        raise ValueError(f"ends and values: expected equal non-empty 1-d, got {e.shape}, {v.shape}")
    if np.any(np.diff(e) <= 0) or np.any(np.diff(x) <= 0):
        raise ValueError("ends and edges must be strictly increasing")
    starts = np.concatenate([[0.0], e[:-1]])
    stops = e.copy()
    stops[-1] = max(stops[-1], x[-1])  # the last update stands for the rest of the axis
    lo, hi = x[:-1, None], x[1:, None]
    overlap = np.clip(np.minimum(hi, stops[None]) - np.maximum(lo, starts[None]), 0, None)
    return (overlap * v[None]).sum(1) / (hi - lo)[:, 0]


def bootstrap_ci(
    samples: np.ndarray, rng: np.random.Generator, *, n: int = 10_000, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean over the first axis (seeds).

    Args:
        samples: ``(S, ...)`` one row per seed.
        rng: the generator of the resamples.
        n: resamples; level: coverage.

    Returns:
        ``(low, high)``, each of shape ``samples.shape[1:]``.
    """
    s = np.asarray(samples, dtype=np.float64)
    idx = rng.integers(0, len(s), size=(n, len(s)))
    means = s[idx].mean(1)
    a = (1 - level) / 2
    return np.quantile(means, a, axis=0), np.quantile(means, 1 - a, axis=0)


def bootstrap_diff_ci(
    a: np.ndarray, b: np.ndarray, rng: np.random.Generator, *, n: int = 10_000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(a) - mean(b)``, seeds resampled in each arm."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = a[rng.integers(0, len(a), (n, len(a)))].mean(1) - b[
        rng.integers(0, len(b), (n, len(b)))
    ].mean(1)
    q = (1 - level) / 2
    return float(np.quantile(d, q)), float(np.quantile(d, 1 - q))


def permutation_test(a: Floats, b: Floats) -> float:
    """Exact two-sided permutation p-value of ``mean(a) - mean(b)``.

    Every split of the pooled values into groups of ``len(a)`` and ``len(b)`` is
    enumerated (252 for 5 + 5 seeds), so the smallest attainable p-value is
    ``2 / C(len(a) + len(b), len(a))``.
    """
    x = np.concatenate([np.asarray(a, float), np.asarray(b, float)])
    na = len(a)
    observed = abs(x[:na].mean() - x[na:].mean())
    total, hits = 0, 0
    for combo in itertools.combinations(range(len(x)), na):
        m = np.zeros(len(x), dtype=bool)
        m[list(combo)] = True
        total += 1
        hits += abs(x[m].mean() - x[~m].mean()) >= observed - 1e-12
    return hits / total


def holm(pvalues: Floats) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adj = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p[i])
        adj[i] = min(1.0, running)
    return adj.tolist()
