"""Metrics: plain values the actors keep, turned into Prometheus metrics at scrape time.

The actors never touch ``prometheus_client``: its counters take a lock on every ``inc``, and
the hot path must gain no lock and no message. Instead every value here has exactly one
writing thread (the actor that owns it); the scrape thread only reads. Under CPython's GIL,
reading an int or copying a dict or a list is atomic, so a scrape sees every value as it was
at some instant; two figures of one scrape may be a step apart (a histogram's count and sum),
which Prometheus tolerates. Gauges that an actor already keeps (the handler pool, the commit
buffer) are read straight from its plain state objects, at no cost to the actor.

``DuplexCollector`` is the bridge: a custom collector registered in the worker's own
``CollectorRegistry`` (not the global one, so two embedded workers never collide).
"""

from __future__ import annotations

import socket
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from loguru import logger
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from duplex.errors import (
    HANDLER_TIMEOUT,
    HANDLER_WORKER_FAILED,
    SHUTDOWN_TIMEOUT,
    WORKER_LOST,
)
from duplex.version import duplex_version

if TYPE_CHECKING:
    from duplex.commit.buffer import CommitBuffer
    from duplex.dispatch.pool import HandlerPool
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
_SYNTHETIC = frozenset({HANDLER_TIMEOUT, SHUTDOWN_TIMEOUT, WORKER_LOST, HANDLER_WORKER_FAILED})


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


@dataclass(frozen=True)
class QueueFigures:
    """Ready steps per namespace and how long the oldest has been ready (seconds)."""

    ready: dict[str, int]
    oldest_age_s: dict[str, float]
    # The relay's lag (``EventLag.as_json``), when this worker runs a relay.
    relay: dict[str, Any] | None = None


class QueueProbe:
    """The queue figures, read from SQL at most once per ``refresh_s`` and cached.

    Several scrapes (Prometheus, a person with curl, /health) share one query.
    """

    def __init__(
        self,
        read: Callable[[], QueueFigures],
        refresh_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: QueueFigures | None = None
        self._read_at = float("-inf")
        self.errors = 0

    def figures(self) -> QueueFigures | None:
        """Return the cached figures, refreshed when older than ``refresh_s``; None if the
        database could not be read (and nothing was read before)."""
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._read_at >= self._refresh_s:
                try:
                    self._cached = self._read()
                except Exception as exc:  # a scrape must answer, database or not
                    self.errors += 1
                    logger.debug("queue figures not refreshed: {}", exc)
                # A failure also waits for the next interval: a dead database is not hammered.
                self._read_at = now
            return self._cached


class WorkerMetrics:
    """Everything a worker measures. The actors write their parts; the collector reads."""

    def __init__(self, worker_id: str, *, hostname: str | None = None) -> None:
        self.worker_id = worker_id
        self.hostname = hostname or socket.gethostname()
        self.version = duplex_version()
        self.started_monotonic = time.monotonic()
        self.claimed = Counter()  # namespace; written by the StepExecutor
        self.steps = StepMetrics()  # written by the CompletionProcessor
        # Plain state objects of the actors, read in place (see the module docstring).
        self.pool: HandlerPool | None = None
        self.buffer: CommitBuffer | None = None
        self.event_counts: Callable[[], dict[str, int]] | None = None
        self.queue: QueueProbe | None = None
        self.draining: Callable[[], bool] = lambda: False

    def uptime_s(self) -> float:
        return time.monotonic() - self.started_monotonic


class DuplexCollector(Collector):
    """Yield the ``duplex_*`` metrics from a ``WorkerMetrics`` at scrape time."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._m = metrics

    def describe(self) -> Iterable[Metric]:
        # No describe-time collection (``register`` would otherwise call ``collect``).
        return []

    def collect(self) -> Iterator[Metric]:
        m = self._m
        info = InfoMetricFamily("duplex_worker", "This worker: version, id and host.")
        info.add_metric([], {"version": m.version, "worker_id": m.worker_id, "host": m.hostname})
        yield info
        yield _gauge(
            "duplex_worker_uptime_seconds", "Seconds since the worker started.", m.uptime_s()
        )
        yield _gauge(
            "duplex_worker_draining", "1 while the worker is stopping.", float(m.draining())
        )
        yield _counter(
            "duplex_steps_claimed",
            "Step attempts claimed by this worker.",
            ["namespace"],
            m.claimed.snapshot(),
        )
        steps = m.steps
        yield _counter(
            "duplex_steps_succeeded",
            "Step attempts committed as succeeded.",
            ["namespace", "handler"],
            steps.succeeded.snapshot(),
        )
        yield _counter(
            "duplex_steps_failed",
            "Step attempts committed as failed, by error_type.",
            ["namespace", "handler", "error_type"],
            steps.failed.snapshot(),
        )
        yield _counter(
            "duplex_step_retries_scheduled",
            "Failed attempts whose step was scheduled for another attempt.",
            ["namespace", "handler"],
            steps.retries.snapshot(),
        )
        yield _counter(
            "duplex_stale_claims_recovered",
            "Running attempts of dead workers recovered as worker_lost by this worker.",
            ["namespace"],
            steps.recovered.snapshot(),
        )
        yield _counter(
            "duplex_late_results_rejected",
            "Results rejected by the commit guard (after a timeout or a recovery).",
            ["namespace"],
            steps.rejected.snapshot(),
        )
        yield _histograms(
            "duplex_handler_duration_seconds",
            "How long handlers ran.",
            ["namespace", "handler"],
            steps.handler_seconds,
        )
        yield _histograms(
            "duplex_claim_to_start_seconds",
            "From the claim to the handler's start (waiting for a slot).",
            ["namespace"],
            steps.claim_to_start,
        )
        yield _histograms(
            "duplex_submit_to_start_seconds",
            "From the task's submission to the start of each of its steps' attempts.",
            ["namespace"],
            steps.submit_to_start,
        )
        yield _histograms(
            "duplex_handler_end_to_commit_seconds",
            "From the handler's end to the commit of its result.",
            ["namespace"],
            steps.end_to_commit,
        )
        batch_buckets, batch_sum = steps.batch_size.cumulative()
        batches = HistogramMetricFamily(
            "duplex_commit_batch_size", "Results per commit transaction."
        )
        batches.add_metric([], batch_buckets, batch_sum)
        yield batches
        yield _counter(
            "duplex_commit_failures",
            "Commit transactions that failed (their results were kept).",
            [],
            {(): steps.commit_failures},
        )
        yield _counter(
            "duplex_commit_retries",
            "Commit transactions tried again after a failure.",
            [],
            {(): steps.commit_retries},
        )
        yield from self._pool_metrics()
        yield from self._buffer_metrics()
        yield from self._event_metrics()
        yield from self._queue_metrics()

    def _pool_metrics(self) -> Iterator[Metric]:
        pool = self._m.pool
        if pool is None:
            return
        running, idle = len(pool.running), len(pool.idle)
        yield _gauge("duplex_handler_slots", "Handler slots (max_concurrent_handlers).", pool.size)
        yield _gauge("duplex_handlers_running", "Handlers running now.", running)
        yield _gauge("duplex_handler_slots_free", "Handler slots free now.", idle)
        yield _gauge(
            "duplex_claims_waiting_for_slot", "Claimed steps waiting for a slot.", len(pool.waiting)
        )
        yield _gauge(
            "duplex_abandoned_threads",
            "Handler threads still stuck after their attempt timed out.",
            len(pool.abandoned),
        )
        yield _counter(
            "duplex_handler_timeouts",
            "Attempts timed out (each abandons a thread until its handler returns).",
            [],
            {(): pool.timeouts},
        )

    def _buffer_metrics(self) -> Iterator[Metric]:
        buffer = self._m.buffer
        if buffer is None:
            return
        yield _gauge(
            "duplex_results_awaiting_commit",
            "Results (and releases) held for a commit.",
            buffer.held,
        )
        yield _gauge(
            "duplex_commit_failing", "1 while commits fail and are retried.", float(buffer.failing)
        )

    def _event_metrics(self) -> Iterator[Metric]:
        counts = self._m.event_counts() if self._m.event_counts is not None else None
        if counts is None:
            return
        for name, key, text in (
            (
                "duplex_domain_events_delivered",
                "delivered",
                "Committed events delivered in-process.",
            ),
            (
                "duplex_domain_events_dropped",
                "dropped",
                "Events dropped: the delivery queue was full.",
            ),
            ("duplex_subscriber_errors", "subscriber_errors", "Subscriber calls that raised."),
        ):
            yield _counter(name, text, [], {(): counts.get(key, 0)})
        yield _gauge(
            "duplex_domain_events_queued", "Events waiting for delivery.", counts.get("queued", 0)
        )

    def _queue_metrics(self) -> Iterator[Metric]:
        probe = self._m.queue
        figures = probe.figures() if probe is not None else None
        if figures is None:
            return
        ready = GaugeMetricFamily(
            "duplex_ready_steps",
            "Steps ready to run (enqueued, or retry due).",
            labels=["namespace"],
        )
        oldest = GaugeMetricFamily(
            "duplex_oldest_ready_step_age_seconds",
            "How long the oldest ready step has been ready.",
            labels=["namespace"],
        )
        for namespace in sorted(figures.ready):
            ready.add_metric([namespace], figures.ready[namespace])
            oldest.add_metric([namespace], figures.oldest_age_s.get(namespace, 0.0))
        yield ready
        yield oldest
        if figures.relay is not None:
            yield from _relay_metrics(figures.relay)


def _relay_metrics(lag: dict[str, Any]) -> Iterator[Metric]:
    yield _gauge(
        "duplex_relay_unpublished_events",
        "Committed events the relay has not published yet (dead-lettered ones included).",
        lag["unpublished"],
    )
    yield _gauge(
        "duplex_relay_dead_lettered_events",
        "Events that failed too often and wait for an operator (events retry or skip).",
        lag["dead_lettered"],
    )
    yield _gauge(
        "duplex_relay_oldest_unpublished_age_seconds",
        "How long the oldest unpublished event has waited (0 when none waits).",
        lag["oldest_unpublished_age_s"] or 0.0,
    )
    yield _gauge(
        "duplex_relay_published_per_second",
        "Events the broker confirmed, per second over the last minute.",
        lag["published_per_s"],
    )


def _float_label(bound: float) -> str:
    return repr(float(bound))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(
    name: str, documentation: str, labels: list[str], values: dict[Key, float]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def _histograms(
    name: str, documentation: str, labels: list[str], histograms: Histograms
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for key, histogram in sorted(histograms.snapshot(), key=lambda item: item[0]):
        buckets, total = histogram.cumulative()
        family.add_metric(list(key), buckets, total)
    return family
