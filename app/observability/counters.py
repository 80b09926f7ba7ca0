"""Plain counters the actors write and the scrape reads: no lock on the hot path.

Every value here has exactly one writing thread (the actor that owns it), except
``EventCounts``, which two threads write under its own lock. Under CPython's GIL, reading an
int or copying a dict or a list is atomic, so a reader sees every value as it was at some
instant; two figures of one read may be a step apart (a histogram's count and sum), which
Prometheus tolerates.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from duplex.errors import (
    HANDLER_TIMEOUT,
    HANDLER_WORKER_FAILED,
    SHUTDOWN_TIMEOUT,
    TASK_DEADLINE_EXCEEDED,
    WORKER_LOST,
)

if TYPE_CHECKING:
    from duplex.storage.results import CommitReport

Key = tuple[str, ...]

# Seconds: from a millisecond no-op to handlers of several minutes.
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

# Outcomes Duplex writes itself rather than a handler: their timestamps are not a handler's
# run, so they stay out of the duration and latency histograms (they are still counted).
_SYNTHETIC = frozenset(
    {HANDLER_TIMEOUT, SHUTDOWN_TIMEOUT, WORKER_LOST, HANDLER_WORKER_FAILED, TASK_DEADLINE_EXCEEDED}
)


class Counter:
    """Counts per label values; one writing thread."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values: dict[Key, float] = {}

    def inc(self, key: Key, amount: float = 1) -> None:
        values = self.values
        values[key] = values.get(key, 0) + amount

    def snapshot(self) -> dict[Key, float]:
        return self.values.copy()

    def total(self) -> float:
        return sum(self.snapshot().values())


class Histogram:
    """Bucket counts and a sum; one writing thread. ``counts[i]`` holds values <= bounds[i]
    (and above bounds[i-1]); the last slot holds the values above every bound."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """Return Prometheus buckets (``le``, cumulative count) and the sum."""
        counts, total = list(self.counts), self.total
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, counts, strict=False):
            running += count
            buckets.append((_float_label(bound), running))
        buckets.append(("+Inf", running + counts[-1]))
        return buckets, total


class Histograms:
    """A histogram per label values, created on first use; one writing thread."""

    __slots__ = ("bounds", "by_key")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.by_key: dict[Key, Histogram] = {}

    def observe(self, key: Key, value: float) -> None:
        histogram = self.by_key.get(key)
        if histogram is None:
            histogram = self.by_key[key] = Histogram(self.bounds)
        histogram.observe(value)

    def snapshot(self) -> list[tuple[Key, Histogram]]:
        return list(self.by_key.items())


@dataclass
class StepMetrics:
    """What the CompletionProcessor learns from each committed batch (its thread only)."""

    succeeded: Counter = field(default_factory=Counter)  # namespace, handler
    failed: Counter = field(default_factory=Counter)  # namespace, handler, error_type
    retries: Counter = field(default_factory=Counter)  # namespace, handler
    recovered: Counter = field(default_factory=Counter)  # namespace
    rejected: Counter = field(default_factory=Counter)  # namespace
    # Tasks this worker expired at their deadline, and the waiting steps that cancelled.
    deadlines_exceeded: Counter = field(default_factory=Counter)  # namespace
    deadline_cancelled_steps: Counter = field(default_factory=Counter)  # namespace
    handler_seconds: Histograms = field(default_factory=lambda: Histograms(DURATION_BUCKETS))
    claim_to_start: Histograms = field(default_factory=lambda: Histograms(DURATION_BUCKETS))
    submit_to_start: Histograms = field(default_factory=lambda: Histograms(DURATION_BUCKETS))
    end_to_commit: Histograms = field(default_factory=lambda: Histograms(DURATION_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    commit_failures: int = 0
    commit_retries: int = 0

    def committed(self, report: CommitReport, now: datetime, *, recovery: bool = False) -> None:
        """Count a committed batch (``recovery``: lost workers' attempts, not our own)."""
        if not recovery:
            self.batch_size.observe(len(report.applied) + len(report.rejected))
        for outcome in report.applied:
            step = outcome.step
            namespace, handler = step.namespace, step.handler
            failure = outcome.failure
            if failure is None:
                self.succeeded.inc((namespace, handler))
            else:
                self.failed.inc((namespace, handler, failure.error_type))
                if recovery:
                    self.recovered.inc((namespace,))
                if failure.error_type in _SYNTHETIC:
                    continue
            started = outcome.started_at
            self.handler_seconds.observe(
                (namespace, handler), (outcome.finished_at - started).total_seconds()
            )
            self.end_to_commit.observe((namespace,), (now - outcome.finished_at).total_seconds())
            if step.claimed_at is not None:
                self.claim_to_start.observe(
                    (namespace,), max(0.0, (started - step.claimed_at).total_seconds())
                )
            if step.submitted_at is not None:
                self.submit_to_start.observe(
                    (namespace,), max(0.0, (started - step.submitted_at).total_seconds())
                )
        for outcome in report.retrying:
            self.retries.inc((outcome.step.namespace, outcome.step.handler))
        for outcome in report.rejected:
            self.rejected.inc((outcome.step.namespace,))
        for task in report.expired:
            self.deadlines_exceeded.inc((task.namespace,))
            if task.cancelled_steps:
                self.deadline_cancelled_steps.inc((task.namespace,), len(task.cancelled_steps))


@dataclass
class ScheduleMetrics:
    """What the worker's schedule firer did (its thread only), per schedule."""

    fires: Counter = field(default_factory=Counter)  # schedule
    skips: Counter = field(default_factory=Counter)  # schedule, reason (overlap | missed)
    overdue: Counter = field(default_factory=Counter)  # schedule


class EventCounts:
    """What the DomainEventPublisher counts, and how many events wait in its queue.

    Its actor and its delivery thread both count, so a lock guards the counts; no one else
    waits on it but a reader.
    """

    KEYS = ("published", "delivered", "dropped", "subscriber_errors")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.KEYS, 0)
        self._queued: Callable[[], int] = lambda: 0

    def watch_queue(self, size: Callable[[], int]) -> None:
        """Learn how to measure the delivery queue (the publisher owns it)."""
        self._queued = size

    def add(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def snapshot(self) -> dict[str, int]:
        """The counts and the queue's length, at one instant."""
        with self._lock:
            return {**self._counts, "queued": self._queued()}


def _float_label(bound: float) -> str:
    return repr(float(bound))
