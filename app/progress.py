"""Progress of ``duplex run --until-idle``: a live bar on a terminal, plain lines otherwise.

Read from the worker's own counters (``app.metrics``) on the main thread; the only query is
the count of open work, at most once a second.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from app.metrics import WorkerMetrics

PLAIN_EVERY_S = 2.0
OPEN_WORK_EVERY_S = 1.0


class RunProgress:
    """Call ``tick`` often and ``close`` once; what it shows depends on the stream."""

    def __init__(
        self,
        metrics: WorkerMetrics,
        open_work: Callable[[], int],
        *,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._open_work = open_work
        self._stream = stream or sys.stdout
        self._clock = clock
        self._started = clock()
        self._open = 0
        self._open_read = float("-inf")
        self._printed = float("-inf")
        self._last_line: str | None = None
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        if self._stream.isatty():
            self._bar = Progress(
                TextColumn("[bold]run --until-idle"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=Console(file=self._stream),
                transient=False,
            )
            self._task = self._bar.add_task("run", total=None, detail="")
            self._bar.start()

    def figures(self) -> tuple[int, int, int, int]:
        """Committed attempts (succeeded, failed), running handlers, open work."""
        steps = self._metrics.steps
        succeeded, failed = int(steps.succeeded.total()), int(steps.failed.total())
        pool = self._metrics.pool
        running = len(pool.running) if pool is not None else 0
        now = self._clock()
        if now - self._open_read >= OPEN_WORK_EVERY_S:
            # A database hiccup keeps the last figure.
            with contextlib.suppress(Exception):
                self._open = self._open_work()
            self._open_read = now
        return succeeded, failed, running, self._open

    def tick(self) -> None:
        succeeded, failed, running, open_work = self.figures()
        done = succeeded + failed
        detail = f"{succeeded} succeeded, {failed} failed, {running} running, {open_work} open"
        if self._bar is not None and self._task is not None:
            # Open work includes what runs now; the total grows as dependents become ready.
            self._bar.update(self._task, completed=done, total=done + open_work, detail=detail)
            return
        now = self._clock()
        line = f"progress: {done} attempt(s) committed ({detail})"
        if now - self._printed >= PLAIN_EVERY_S and line != self._last_line:
            print(line, file=self._stream, flush=True)
            self._printed, self._last_line = now, line

    def close(self) -> None:
        succeeded, failed, _, open_work = self.figures()
        if self._bar is not None:
            self._bar.stop()
        elapsed = self._clock() - self._started
        print(
            f"done: {succeeded + failed} attempt(s) committed ({succeeded} succeeded, "
            f"{failed} failed) in {elapsed:.1f}s; {open_work} open",
            file=self._stream,
            flush=True,
        )
