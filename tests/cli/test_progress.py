"""``duplex run --until-idle``'s progress lines and summary (``duplex.cli.progress``), piped."""

from __future__ import annotations

import io

from duplex.cli.progress import RunProgress
from duplex.observability.metrics import WorkerMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_summary_reads_what_is_left_after_the_last_commit() -> None:
    """A retry counted during the run fails for good half a second before the end: the summary
    must not repeat the figure read a moment earlier."""
    metrics, clock, out = WorkerMetrics("w"), Clock(), io.StringIO()
    left = [1]
    progress = RunProgress(metrics, lambda: left[0], stream=out, clock=clock)
    metrics.steps.succeeded.inc(("default", "h"))
    progress.tick()  # reads 1: a step waits for its retry
    clock.now = 0.5
    metrics.steps.failed.inc(("default", "h", "handler_error"))
    left[0] = 0  # its last attempt failed for good
    progress.tick()
    progress.close()
    lines = out.getvalue().splitlines()
    assert (
        lines[0] == "progress: 1 attempt(s) committed (1 succeeded, 0 failed, 0 running, 1 to run)"
    )
    assert lines[-1] == (
        "done: 2 attempt(s) committed (1 succeeded, 1 failed) in 0.5s; nothing left to run"
    )


def test_the_summary_says_what_is_still_to_run_when_stopped_early() -> None:
    metrics, clock, out = WorkerMetrics("w"), Clock(), io.StringIO()
    progress = RunProgress(metrics, lambda: 3, stream=out, clock=clock)
    clock.now = 2.0
    progress.close()
    assert out.getvalue().splitlines()[-1] == (
        "done: 0 attempt(s) committed (0 succeeded, 0 failed) in 2.0s; "
        "3 step(s) still to run (enqueued, running, waiting for a retry or held by a "
        "concurrency key)"
    )


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_s_last_frame_shows_results_committed_after_the_last_tick() -> None:
    metrics, clock, out = WorkerMetrics("w"), Clock(), Terminal()
    progress = RunProgress(metrics, lambda: 0, stream=out, clock=clock)
    metrics.steps.succeeded.inc(("default", "h"))
    progress.tick()
    # The last two results commit after the last tick, before the worker stops.
    metrics.steps.succeeded.inc(("default", "h"))
    metrics.steps.succeeded.inc(("default", "h"))
    progress.close()
    last_frame, summary = out.getvalue().rsplit("\n", 2)[-3:-1]
    assert "3/3" in last_frame
    assert "done: 3 attempt(s) committed" in summary
