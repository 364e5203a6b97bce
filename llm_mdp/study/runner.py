"""Run a study's grid, resumably: one run per process slot, each result written atomically.

A study folder holds::

    runs/<key>.csv    one row per update (the curve: reward against generated tokens,
                      forward positions, seconds)
    runs/<key>.json   the run's spec, its final numbers and the same rows; written last,
                      by rename, so its presence means the run finished
    tuning.json       the learning rate picked for each tuned agent, and the search
    summary.json, summary.csv, *.png   (llm_mdp.study.report)

A finished run is never redone; a run killed midway left no ``.json`` and is run again
from its start (runs are seeded, so the result is the same). A folder whose run file
holds another spec under the same key (the study file changed) is refused.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_mdp.study.spec import RunSpec, StudyError, StudySpec

__all__ = ["ROW_FIELDS", "pick_learning_rates", "run_one", "run_study"]

ROW_FIELDS = (
    "update",
    "generated_tokens",
    "forward_positions",
    "episodes",
    "tokens",
    "seconds",
    "reward/mean",
    "response/length",
)
"""Columns of a run's CSV: counters after each update, and that update's mean reward."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_one(run: RunSpec, runs_dir: Path, threads: int = 1) -> dict[str, Any]:
    """Train one run to its token budget; write ``<key>.csv`` then ``<key>.json``.

    Returns the JSON record: ``spec``, ``rows`` (one dict of :data:`ROW_FIELDS` per
    update), ``greedy`` (mean greedy reward over the task's prompts after training),
    ``optimum`` (the task's optimal reward) and ``seconds`` (training wall time).
    """
    import torch

    from llm_mdp.cli.build import build

    torch.set_num_threads(threads)
    opts: dict[str, Any] = {
        "agent": run.agent,
        "task": run.task,
        "task_args": dict(run.task_args),
        "model": run.model,
        "num_envs": run.num_envs,
        "seed": run.seed,
        "device": "cpu",
        "lr": None,
        "agent_config": dict(run.config),
        "threads": threads,
        "parallel": "dp",
    }
    env, policy, cls, config = build(opts)
    agent = cls(env, policy, config)
    rows: list[dict[str, float]] = []
    seconds = 0.0

    def record(a: Any, m: dict[str, float]) -> None:
        nonlocal seconds
        seconds += m["time/rollout"] + m["time/update"]
        rows.append({k: (seconds if k == "seconds" else m[k]) for k in ROW_FIELDS})

    t0 = time.perf_counter()
    agent.learn(total_generated_tokens=run.budget, progress=False, callback=record)
    wall = time.perf_counter() - t0
    record_ = {
        "spec": run.to_dict(),
        "rows": rows,
        "greedy": agent.evaluate(),
        "optimum": env.task.optimal_reward,
        "seconds": wall,
    }
    runs_dir.mkdir(parents=True, exist_ok=True)
    lines = [",".join(ROW_FIELDS)] + [",".join(repr(r[k]) for k in ROW_FIELDS) for r in rows]
    _write_atomic(runs_dir / f"{run.key}.csv", "\n".join(lines) + "\n")
    _write_atomic(runs_dir / f"{run.key}.json", json.dumps(record_, indent=1))
    return record_


def load_run(run: RunSpec, runs_dir: Path) -> dict[str, Any] | None:
    """The finished run's record, ``None`` if it has not finished; refuses another spec."""
    path = runs_dir / f"{run.key}.json"
    if not path.exists():
        return None
    rec: dict[str, Any] = json.loads(path.read_text())
    if rec.get("spec") != run.to_dict():
        raise StudyError(
            f"{path} holds a run with other settings ({rec.get('spec')}) than the study's "
            f"({run.to_dict()}); the study file changed: use another --out or --overwrite"
        )
    return rec


def final_reward(rec: dict[str, Any], fraction: float) -> float:
    """Mean training reward over the last ``fraction`` of the run's token budget.

    Each update's mean reward stands for the tokens it generated, so the mean is
    token-weighted over ``((1 - fraction) B, B]`` and a large last update (TRePO's)
    counts only up to the budget.
    """
    from llm_mdp.study.stats import window_means

    B = rec["spec"]["budget"]
    rows = rec["rows"]
    ends = [r["generated_tokens"] for r in rows]
    values = [r["reward/mean"] for r in rows]
    return float(window_means(ends, values, [(1 - fraction) * B, B])[0])


def pick_learning_rates(
    spec: StudySpec, records: dict[str, dict[str, Any]], grids: dict[str, list[float]]
) -> dict[str, Any]:
    """Per tuned label, the rate of its grid with the best mean final reward (as a
    fraction of each task's optimum) over the tune tasks; ties go to the smaller rate."""
    picked: dict[str, float] = {}
    scores: dict[str, dict[str, float]] = {}
    for label, grid in grids.items():
        scores[label] = {}
        for lr in grid:
            vals = []
            for task in spec.tune_tasks:
                run = spec.run_spec(label, task, spec.tune_seed, lr, "tune")
                rec = records[run.key]
                vals.append(final_reward(rec, spec.final_fraction) / rec["optimum"])
            scores[label][f"{lr:g}"] = sum(vals) / len(vals)
        best = max(scores[label].values())
        picked[label] = min(float(k) for k, v in scores[label].items() if v == best)
    return {"learning_rates": picked, "scores": scores}


def extend_grids(grids: dict[str, list[float]], picked: dict[str, float]) -> bool:
    """Add one rate beyond the edge of each grid whose best rate is on that edge (the
    grid's outer ratio once more); returns whether any grid grew."""
    grew = False
    for label, g in grids.items():
        if len(g) < 2:
            continue
        if picked[label] == g[-1]:
            g.append(g[-1] * g[-1] / g[-2])
            grew = True
        elif picked[label] == g[0]:
            g.insert(0, g[0] * g[0] / g[1])
            grew = True
    return grew


@dataclass
class _Quota:
    """Runs this call may still start (``None``: no limit)."""

    left: int | None

    def take(self, runs: list[RunSpec]) -> list[RunSpec]:
        if self.left is None:
            return list(runs)
        taken = runs[: self.left]
        self.left -= len(taken)
        return taken


def _execute(
    runs: list[RunSpec],
    runs_dir: Path,
    threads: int,
    jobs: int,
    quota: _Quota,
    on_done: Callable[[dict[str, Any]], None],
) -> bool:
    """Run what ``quota`` allows of ``runs`` in ``jobs`` worker processes (1: in this
    process), calling ``on_done`` with each record; returns whether all of them ran."""
    todo = quota.take(runs)
    if jobs <= 1:
        for run in todo:
            on_done(run_one(run, runs_dir, threads))
        return len(todo) == len(runs)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        pending: set[Future[dict[str, Any]]] = set()
        try:
            for run in todo:
                pending.add(pool.submit(run_one, run, runs_dir, threads))
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    on_done(f.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return len(todo) == len(runs)


def run_study(
    spec: StudySpec,
    out: Path,
    *,
    jobs: int = 1,
    max_runs: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Run (or continue) every run of ``spec`` into ``out``; then write the report.

    Args:
        spec: the study.
        out: its folder (created; a folder of the same study continues where it stopped).
        jobs: runs at a time, each in its own process with ``spec.threads`` torch threads.
        max_runs: start at most this many runs in this call (then stop, as a kill would).
        progress: a progress bar over the whole grid (tuning runs included).
        log: where one-line messages go.

    Returns:
        The summary (see :func:`llm_mdp.study.report.write_report`), or ``None`` when
        ``max_runs`` stopped the study before its end.
    """
    from tqdm.auto import tqdm

    from llm_mdp.study.report import write_report

    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    grids = {k: sorted(spec.tune_learning_rates) for k in spec.agents if spec.tuned(k)}
    tune = spec.tune_runs()
    records: dict[str, dict[str, Any]] = {}

    def collect(runs: Iterable[RunSpec]) -> list[RunSpec]:
        todo = []
        for run in runs:
            rec = load_run(run, runs_dir)
            if rec is None:
                todo.append(run)
            else:
                records[run.key] = rec
        return todo

    n_main = len(spec.agents) * len(spec.tasks) * len(spec.seeds)
    todo_tune = collect(tune)
    bar = tqdm(
        total=len(tune) + n_main,
        desc=f"study {spec.name}",
        unit="run",
        disable=not progress,
        dynamic_ncols=True,
    )
    bar.update(len(tune) - len(todo_tune))
    left = _Quota(max_runs)

    def done(rec: dict[str, Any]) -> None:
        run = RunSpec(**rec["spec"])
        records[run.key] = rec
        bar.set_postfix_str(f"{run.key} {rec['seconds']:.0f}s", refresh=False)
        bar.update(1)

    try:
        if not _execute(todo_tune, runs_dir, spec.threads, jobs, left, done):
            return None
        tuning = pick_learning_rates(spec, records, grids)
        for _ in range(spec.tune_extend):  # a best rate on the grid's edge: look beyond it
            if not extend_grids(grids, tuning["learning_rates"]):
                break
            extra = [
                spec.run_spec(label, task, spec.tune_seed, lr, "tune")
                for label, grid in grids.items()
                for task in spec.tune_tasks
                for lr in grid
            ]
            todo = collect(extra)
            bar.total += len(todo)
            if not _execute(todo, runs_dir, spec.threads, jobs, left, done):
                return None
            tuning = pick_learning_rates(spec, records, grids)
        _write_atomic(out / "tuning.json", json.dumps(tuning, indent=1))
        main = spec.main_runs(tuning["learning_rates"])
        todo_main = collect(main)
        bar.update(len(main) - len(todo_main))
        if not _execute(todo_main, runs_dir, spec.threads, jobs, left, done):
            return None
    finally:
        bar.close()
    summary = write_report(spec, [records[r.key] for r in main], tuning, out)
    log(f"wrote {out / 'summary.json'}, {out / 'summary.csv'} and figures")
    return summary
