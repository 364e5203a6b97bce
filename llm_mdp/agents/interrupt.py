"""Stopping training cleanly on Ctrl-C or SIGTERM: finish the update, save, then stop.

While :class:`StopOnSignal` is active (in ``Agent.learn``), the first SIGINT or SIGTERM
only sets a flag; the loop checks it after each update, when the agent's state is
consistent, saves a checkpoint and raises :class:`TrainingInterrupted`. A second signal
interrupts at once (a plain ``KeyboardInterrupt``). Handlers are installed only in the
main thread (Python delivers signals there) and restored on exit.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

__all__ = ["StopOnSignal", "TrainingInterrupted"]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal (or a ``KeyboardInterrupt`` from a callback).

    Attributes:
        update: the last completed update.
        checkpoint: the checkpoint saved at ``update``, or ``None`` when the interrupt
            came inside an update (the last periodic checkpoint, if any, is kept).
        signum: the signal number (``signal.SIGINT`` for a ``KeyboardInterrupt``).
    """

    def __init__(self, update: int, checkpoint: Path | None, signum: int) -> None:
        where = f"checkpoint {checkpoint} at update {update}" if checkpoint else "no new checkpoint"
        super().__init__(f"training interrupted after update {update}; {where}")
        self.update, self.checkpoint, self.signum = update, checkpoint, signum


class StopOnSignal:
    """Context manager: SIGINT / SIGTERM request a stop instead of raising at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this update and saving a "
            "checkpoint (send it again to stop at once)",
            file=sys.stderr,
        )

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
