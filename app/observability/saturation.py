"""Saturation warnings: one log line per condition per interval, carrying the figures.

Plain code, no threads: the worker's watchdog feeds a ``Sample`` every tick (``sample_of``
the worker's figures, no message) and asks for the interval's warnings when it ends.
Conditions, each judged over the whole interval:

* every handler slot stayed busy while work was waiting (claimed, or ready in SQL);
* the completion path fell behind: a full commit batch waited, or commits failed;
* domain events were dropped (the in-process delivery queue was full);
* the heartbeat lagged: no successful beat for more than two intervals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from duplex.observability.metrics import WorkerMetrics


@dataclass(frozen=True)
class Sample:
    """The worker's load at one instant."""

    slots: int
    running: int
    waiting_for_slot: int
    awaiting_commit: int
    commit_batch_size: int
    commit_failing: bool
    events_dropped: int  # since start
    heartbeat_age_s: float
    heartbeat_interval_s: float


def sample_of(
    metrics: WorkerMetrics, *, heartbeat_age_s: float, heartbeat_interval_s: float
) -> Sample | None:
    """The load as the worker's figures show it now; None before its actors started."""
    slots, commit = metrics.slots(), metrics.commit()
    if slots is None or commit is None:
        return None
    counts = metrics.event_counts()
    return Sample(
        slots=slots.total,
        running=slots.running,
        waiting_for_slot=slots.waiting,
        awaiting_commit=commit.awaiting,
        commit_batch_size=commit.batch_size,
        commit_failing=commit.failing,
        events_dropped=counts["dropped"] if counts is not None else 0,
        heartbeat_age_s=heartbeat_age_s,
        heartbeat_interval_s=heartbeat_interval_s,
    )


class SaturationMonitor:
    """Accumulate samples over an interval; at its end, say which conditions held."""

    def __init__(self, interval_s: float, *, start: float) -> None:
        self.interval_s = interval_s
        self._start = start
        self._dropped_at_start: int | None = None
        self._reset()

    def _reset(self) -> None:
        self._samples = 0
        self._all_busy = True
        self._waiting_max = 0
        self._lag_max = 0
        self._failing = False
        self._heartbeat_max = 0.0
        self._heartbeat_interval = 0.0
        self._batch_size = 0
        self._slots = 0
        self._dropped_last: int | None = None

    def observe(self, sample: Sample) -> None:
        if self._dropped_at_start is None:
            self._dropped_at_start = sample.events_dropped
        self._samples += 1
        self._slots = sample.slots
        self._all_busy = self._all_busy and sample.running >= sample.slots
        self._waiting_max = max(self._waiting_max, sample.waiting_for_slot)
        self._lag_max = max(self._lag_max, sample.awaiting_commit)
        self._batch_size = sample.commit_batch_size
        self._failing = self._failing or sample.commit_failing
        self._heartbeat_max = max(self._heartbeat_max, sample.heartbeat_age_s)
        self._heartbeat_interval = sample.heartbeat_interval_s
        self._dropped_last = sample.events_dropped

    def report(self, now: float, ready_steps: Callable[[], int | None]) -> list[str]:
        """At the end of an interval, return its warnings (and start the next interval);
        before it, return nothing. ``ready_steps`` is asked only when every slot was busy."""
        elapsed = now - self._start
        if elapsed < self.interval_s:
            return []
        lines: list[str] = []
        if self._samples:
            lines.extend(self._warnings(elapsed, ready_steps))
        self._dropped_at_start = self._dropped_last
        self._start = now
        self._reset()
        return lines

    def _warnings(self, elapsed: float, ready_steps: Callable[[], int | None]) -> list[str]:
        lines = []
        if self._all_busy:
            ready = ready_steps() if self._waiting_max == 0 else None
            if self._waiting_max or ready:
                lines.append(
                    f"saturated: all {self._slots} handler slots busy for the last "
                    f"{elapsed:.0f}s with work waiting ({self._waiting_max} claimed step(s) "
                    f"waiting for a slot"
                    + (f", {ready} ready in SQL" if ready else "")
                    + "); more slots or workers would help"
                )
        if self._failing or self._lag_max >= self._batch_size > 0:
            lines.append(
                f"completion path behind: up to {self._lag_max} result(s) awaiting commit in "
                f"the last {elapsed:.0f}s (batch size {self._batch_size}), commits "
                + ("failing" if self._failing else "not failing")
            )
        dropped = (self._dropped_last or 0) - (self._dropped_at_start or 0)
        if dropped > 0:
            lines.append(
                f"{dropped} domain event(s) dropped in the last {elapsed:.0f}s: the in-process "
                "delivery queue was full (domain_events.buffer_size); they remain in the "
                "domain_events table"
            )
        if self._heartbeat_interval and self._heartbeat_max > 2 * self._heartbeat_interval:
            lines.append(
                f"heartbeat lagging: up to {self._heartbeat_max:.1f}s since the last "
                f"successful beat (interval {self._heartbeat_interval:g}s)"
            )
        return lines
