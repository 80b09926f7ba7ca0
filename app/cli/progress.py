"""Progress of ``duplex run --until-idle``: a live bar on a terminal, plain lines otherwise.

Read from the worker's own counters (``duplex.observability.metrics``) on the main thread.
The only query is the count of steps still to run (enqueued, running or waiting for a retry: what
``--until-idle`` waits for), at most once a second while running, and afresh for the summary.
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

from duplex.observability.metrics import WorkerMetrics

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

    def figures(self, *, fresh: bool = False) -> tuple[int, int, int, int]:
        """Committed attempts (succeeded, failed), running handlers, steps still to run.

        The last figure is re-read at most once a second, or now when ``fresh``.
        """
        steps = self._metrics.steps
        succeeded, failed = int(steps.succeeded.total()), int(steps.failed.total())
        slots = self._metrics.slots()
        running = slots.running if slots is not None else 0
        now = self._clock()
        if fresh or now - self._open_read >= OPEN_WORK_EVERY_S:
            # A database hiccup keeps the last figure.
            with contextlib.suppress(Exception):
                self._open = self._open_work()
            self._open_read = now
        return succeeded, failed, running, self._open

    def tick(self) -> None:
        succeeded, failed, running, open_work = self.figures()
        done = succeeded + failed
        detail = f"{succeeded} succeeded, {failed} failed, {running} running, {open_work} to run"
        if self._bar is not None:
            self._draw(done, open_work, detail)
            return
        now = self._clock()
        line = f"progress: {done} attempt(s) committed ({detail})"
        if now - self._printed >= PLAIN_EVERY_S and line != self._last_line:
            print(line, file=self._stream, flush=True)
            self._printed, self._last_line = now, line

    def close(self) -> None:
        """Print the summary, with the steps still to run read now (a figure cached during
        the run could be a second old and count a retry that has since failed for good)."""
        succeeded, failed, running, open_work = self.figures(fresh=True)
        if self._bar is not None:
            # The last frame shows the final figures, not those of the last tick: the last
            # results may have been committed after it.
            self._draw(
                succeeded + failed,
                open_work,
                f"{succeeded} succeeded, {failed} failed, {running} running, {open_work} to run",
            )
            self._bar.stop()
        elapsed = self._clock() - self._started
        left = (
            "nothing left to run"
            if open_work == 0
            else f"{open_work} step(s) still to run (enqueued, running, waiting for a retry "
            "or held by a concurrency key)"
        )
        print(
            f"done: {succeeded + failed} attempt(s) committed ({succeeded} succeeded, "
            f"{failed} failed) in {elapsed:.1f}s; {left}",
            file=self._stream,
            flush=True,
        )

    def _draw(self, done: int, open_work: int, detail: str) -> None:
        if self._bar is None or self._task is None:
            return
        # Open work includes what runs now; the total grows as dependents become ready.
        self._bar.update(self._task, completed=done, total=done + open_work, detail=detail)
