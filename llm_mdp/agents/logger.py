"""Metrics per update: a progress bar on stdout, ``metrics.csv``, TensorBoard when installed."""

from __future__ import annotations

import csv
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
        start: the update the run resumes from.
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
        self.bar = tqdm(
            desc=desc,
            total=total,
            initial=start,
            disable=not progress,
            unit="update",
            dynamic_ncols=True,
        )
        self._csv_file: TextIO | None = None
        self._writer: csv.DictWriter[str] | None = None
        self._tb: Any = None
        self.path: Path | None = None
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.path = run_dir / "metrics.csv"
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(run_dir / "tb"))
                except Exception:  # tensorboard not installed: CSV is enough
                    self._tb = None

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


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Read a ``metrics.csv`` back as a list of float dicts."""
    with Path(path).open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
