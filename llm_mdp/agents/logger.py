"""Metrics per update: a progress bar on stdout, ``metrics.csv``, TensorBoard when installed.

A run folder's ``metrics.csv`` holds one row per update, never two: a logger that starts
at update ``k > 0`` (an agent loaded from its checkpoint) first drops the rows past ``k``
(written after that checkpoint by a run that was then interrupted), and a logger that
starts at update 0 refuses a folder that already holds rows, instead of appending a
second run to the first.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm


class MetricsLogger:
    """Write one row of metrics per update.

    Args:
        run_dir: folder for ``metrics.csv`` and ``tb/`` (``None``: stdout only).
        progress: show a tqdm bar with reward and KL (off: nothing on stdout).
        desc: the bar's label (the agent's name), so runs one after another are told apart.
        total: the target update count, for the bar.
        start: the update the run resumes from (its rows past ``start`` are dropped).
        tensorboard: also write TensorBoard scalars when ``torch.utils.tensorboard``
            (the ``tensorboard`` package) is importable.
    """

    def __init__(
        self,
        run_dir: Path | None,
        *,
        progress: bool = True,
        desc: str | None = None,
        total: int | None = None,
        start: int = 0,
        tensorboard: bool = True,
    ) -> None:
        self._csv_file: TextIO | None = None
        self._writer: csv.DictWriter[str] | None = None
        self._tb: Any = None
        self.path: Path | None = None
        self.dropped = 0  # rows past ``start`` removed from an interrupted run's metrics.csv
        if run_dir is not None:
            self.path = Path(run_dir) / "metrics.csv"
            self.dropped = truncate_metrics(self.path, start)
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(run_dir / "tb"))
                except Exception:  # tensorboard not installed: CSV is enough
                    self._tb = None
        self.bar = tqdm(
            total=total,
            initial=start,
            desc=desc,
            disable=not progress,
            unit="update",
            dynamic_ncols=True,
        )

    def log(self, metrics: dict[str, float]) -> None:
        if self.path is not None:
            if self._writer is None:
                fields = list(metrics)
                new = not self.path.exists() or self.path.stat().st_size == 0
                if not new:  # resuming: keep the existing header
                    with self.path.open() as f:
                        fields = next(csv.reader(f), fields)
                self._csv_file = self.path.open("a", newline="")
                self._writer = csv.DictWriter(
                    self._csv_file, fieldnames=fields, extrasaction="ignore"
                )
                if new:
                    self._writer.writeheader()
            self._writer.writerow(metrics)
            assert self._csv_file is not None
            self._csv_file.flush()
        if self._tb is not None:
            step = int(metrics.get("update", 0))
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        post = {"reward": f"{metrics.get('reward/mean', float('nan')):.3f}"}
        if "kl/ref" in metrics:
            post["kl"] = f"{metrics['kl/ref']:.4f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self._csv_file is not None:
            self._csv_file.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(path: Path, start: int) -> int:
    """Keep the rows of ``path`` with ``update <= start``; return how many were dropped.

    Raises:
        FileExistsError: ``start == 0`` and ``path`` already holds rows (another run).
    """
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        rows = list(reader)
    if not rows:
        return 0
    if start == 0:
        raise FileExistsError(
            f"{str(path)!r} already holds {len(rows)} updates of another run; continue it "
            "with Agent.load(<its checkpoint>, env, policy, run_dir=...) or log to a new folder"
        )
    try:
        col = header.index("update")
        keep = [r for r in rows if float(r[col]) <= start]
    except (ValueError, IndexError):
        raise ValueError(
            f"{str(path)!r} is not a metrics file (no numeric 'update' column)"
        ) from None
    if len(keep) < len(rows):
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(keep)
        os.replace(tmp, path)
    return len(rows) - len(keep)


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Read a ``metrics.csv`` back as a list of float dicts."""
    with Path(path).open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
