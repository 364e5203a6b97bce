"""A finished study's summary (JSON, CSV), its statement per task, and its figures.

``summary.json`` has two parts: ``results`` is a pure function of the runs (rewards,
intervals, tests, token and forward-position counts: equal for a resumed and an
uninterrupted study), ``timing`` holds wall-clock seconds, which are not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from llm_mdp.study.spec import StudySpec
from llm_mdp.study.stats import (
    bootstrap_ci,
    bootstrap_diff_ci,
    holm,
    permutation_test,
    window_means,
)

__all__ = ["format_costs", "format_table", "summarize", "write_report"]

STATS_SEED = 20250602  # the bootstrap's generator: a summary is reproducible


def _final(rec: dict[str, Any], fraction: float) -> float:
    from llm_mdp.study.runner import final_reward

    return final_reward(rec, fraction)


def _at_budget(rec: dict[str, Any], key: str) -> float:
    """``key``'s counter scaled to the budget: the run's total times budget / generated."""
    last = rec["rows"][-1]
    return float(last[key]) * rec["spec"]["budget"] / float(last["generated_tokens"])


def summarize(spec: StudySpec, records: list[dict[str, Any]], tuning: dict[str, Any]) -> dict:
    """Per task and agent label: final reward with a 95% bootstrap interval over seeds,
    greedy reward, cost per generated token; pairwise tests; learning curves."""
    rng = np.random.default_rng(STATS_SEED)
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in records:
        s = rec["spec"]
        by.setdefault((s["task"], s["label"]), []).append(rec)
    labels = list(spec.agents)
    B = spec.budget
    grid = np.linspace(0, B, spec.points + 1)
    results: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    comparisons: dict[str, list[dict[str, Any]]] = {}
    statements: dict[str, str] = {}
    for task in spec.tasks:
        res: dict[str, Any] = {}
        finals: dict[str, np.ndarray] = {}
        for label in labels:
            recs = sorted(by[(task, label)], key=lambda r: r["spec"]["seed"])
            f = np.array([_final(r, spec.final_fraction) for r in recs])
            g = np.array([r["greedy"] for r in recs])
            curves = np.stack(
                [
                    window_means(
                        [row["generated_tokens"] for row in r["rows"]],
                        [row["reward/mean"] for row in r["rows"]],
                        grid,
                    )
                    for r in recs
                ]
            )
            lo, hi = bootstrap_ci(f, rng)
            c_lo, c_hi = bootstrap_ci(curves, rng)
            g_lo, g_hi = bootstrap_ci(g, rng)
            finals[label] = f
            res[label] = {
                "learning_rate": recs[0]["spec"]["config"]["learning_rate"],
                "final": float(f.mean()),
                "final_ci": [float(lo), float(hi)],
                "final_per_seed": f.tolist(),
                "greedy": float(g.mean()),
                "greedy_ci": [float(g_lo), float(g_hi)],
                "updates": float(np.mean([len(r["rows"]) for r in recs])),
                "episodes": float(np.mean([_at_budget(r, "episodes") for r in recs])),
                "forward_per_generated": float(
                    np.mean([_at_budget(r, "forward_positions") / B for r in recs])
                ),
                "curve": {
                    "tokens": grid[1:].tolist(),
                    "mean": curves.mean(0).tolist(),
                    "low": np.asarray(c_lo).tolist(),
                    "high": np.asarray(c_hi).tolist(),
                },
            }
            timing.setdefault(task, {})[label] = {
                "seconds": float(np.mean([_at_budget(r, "seconds") for r in recs])),
            }
        results[task] = res
        comparisons[task], statements[task] = _compare(labels, finals, rng)
    return {
        "study": spec.name,
        "budget_generated_tokens": B,
        "seeds": spec.seeds,
        "final_fraction": spec.final_fraction,
        "learning_rates": tuning["learning_rates"],
        "results": results,
        "comparisons": comparisons,
        "statements": statements,
        "timing": timing,
    }


def _compare(
    labels: list[str], finals: dict[str, np.ndarray], rng: np.random.Generator
) -> tuple[list[dict[str, Any]], str]:
    """Every pair's difference of mean final reward: bootstrap interval, exact
    permutation p, Holm-adjusted p; and a sentence listing the significant ones (the
    bootstrap 95% interval of the difference excludes 0)."""
    rows: list[dict[str, Any]] = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            lo, hi = bootstrap_diff_ci(finals[a], finals[b], rng)
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "diff": float(finals[a].mean() - finals[b].mean()),
                    "diff_ci": [lo, hi],
                    "p_permutation": permutation_test(finals[a], finals[b]),
                }
            )
    for row, p in zip(rows, holm([r["p_permutation"] for r in rows]), strict=True):
        row["p_holm"] = p
        row["significant"] = bool(row["diff_ci"][0] > 0 or row["diff_ci"][1] < 0)
    order = sorted(labels, key=lambda k: -finals[k].mean())
    wins = [
        f"{r['a']} > {r['b']}" if r["diff"] > 0 else f"{r['b']} > {r['a']}"
        for r in rows
        if r["significant"]
    ]
    ranking = " > ".join(f"{k} ({finals[k].mean():.3f})" for k in order)
    statement = f"ranking by mean: {ranking}. Significant (bootstrap 95% CI of the difference "
    statement += "excludes 0): " + (", ".join(wins) if wins else "none") + "."
    return rows, statement


def write_report(
    spec: StudySpec, records: list[dict[str, Any]], tuning: dict[str, Any], out: Path
) -> dict[str, Any]:
    """Write ``summary.json``, ``summary.csv`` and the figures into ``out``; return the
    summary."""
    from llm_mdp.study.figures import plot_costs, plot_curves

    summary = summarize(spec, records, tuning)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "summary.json")
    head = "task,agent,learning_rate,final,final_low,final_high,greedy,updates,episodes,"
    head += "forward_per_generated,seconds"
    lines = [head]
    for task, res in summary["results"].items():
        for label, r in res.items():
            sec = summary["timing"][task][label]["seconds"]
            lines.append(
                f"{task},{label},{r['learning_rate']:g},{r['final']:.4f},{r['final_ci'][0]:.4f},"
                f"{r['final_ci'][1]:.4f},{r['greedy']:.4f},{r['updates']:.1f},"
                f"{r['episodes']:.0f},{r['forward_per_generated']:.2f},{sec:.1f}"
            )
    (out / "summary.csv").write_text("\n".join(lines) + "\n")
    plot_curves(summary, out / f"{spec.name}_curves.png")
    plot_costs(summary, out / f"{spec.name}_costs.png")
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The final-reward table as Markdown: mean [95% CI] per task (rows: agents)."""
    tasks = list(summary["results"])
    labels = list(next(iter(summary["results"].values())))
    lines = ["| agent | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for label in labels:
        cells = []
        for t in tasks:
            r = summary["results"][t][label]
            cells.append(f"{r['final']:.3f} [{r['final_ci'][0]:.3f}, {r['final_ci'][1]:.3f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_costs(summary: dict[str, Any]) -> str:
    """What the token budget cost each agent, as Markdown: updates, episodes, forward
    positions per generated token and wall seconds per run (means over seeds and tasks)."""
    tasks = list(summary["results"])
    labels = list(next(iter(summary["results"].values())))
    lines = [
        "| agent | learning rate | updates | episodes | forward positions / generated token "
        "| seconds per run |",
        "|---|---|---|---|---|---|",
    ]
    for label in labels:
        rs = [summary["results"][t][label] for t in tasks]
        sec = [summary["timing"][t][label]["seconds"] for t in tasks]
        lines.append(
            f"| {label} | {rs[0]['learning_rate']:g} "
            f"| {np.mean([r['updates'] for r in rs]):.0f} "
            f"| {np.mean([r['episodes'] for r in rs]):.0f} "
            f"| {np.mean([r['forward_per_generated'] for r in rs]):.1f} "
            f"| {np.mean(sec):.0f} |"
        )
    return "\n".join(lines)
