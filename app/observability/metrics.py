"""Metrics: one read-only view of a worker's figures, and its Prometheus bridge.

``WorkerMetrics`` is what every observer reads: the ``/metrics`` scrape, ``/health``, the
saturation warnings, the heartbeat and the run progress. The actors never touch
``prometheus_client`` (its counters take a lock on every ``inc``; the hot path must gain no
lock and no message): they increment plain counters (``duplex.observability.counters``), and
the state they already keep (the handler pool, the commit buffer, the event counts) is created
by the worker, handed to its actor and attached here, to be read in place at no cost to the
actor. Readers never write.

``DuplexCollector`` is the bridge: a custom collector registered in the worker's own
``CollectorRegistry`` (not the global one, so two embedded workers never collide).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from duplex.observability.counters import (
    Counter,
    EventCounts,
    ScheduleMetrics,
    StepMetrics,
)
from duplex.observability.families import counter, gauge, histograms
from duplex.observability.flow import flow_gauges
from duplex.observability.queue import QueueFigures, QueueProbe
from duplex.observability.schedule_metrics import schedule_metrics
from duplex.version import duplex_version

if TYPE_CHECKING:
    from duplex.commit.buffer import CommitBuffer
    from duplex.dispatch.pool import HandlerPool


@dataclass(frozen=True)
class SlotFigures:
    """The handler pool at one instant."""

    total: int
    running: int
    free: int
    waiting: int  # claimed steps waiting for a slot
    abandoned_threads: int  # handler threads still stuck after their attempt timed out
    timeouts: int  # since start


@dataclass(frozen=True)
class CommitFigures:
    """The commit buffer at one instant."""

    awaiting: int  # results (and releases) held for a commit
    batch_size: int
    failing: bool


class WorkerMetrics:
    """Everything a worker measures, as one read-only view.

    ``claimed`` (the StepExecutor's), ``claimed_eagerly`` and ``steps`` (the
    CompletionProcessor's) are counters their actor increments. The handler pool, the commit
    buffer and the event counts are the actors' plain state, attached by the worker when it
    starts them; until then (and in a view nobody attached) their figures are None.
    """

    def __init__(
        self,
        worker_id: str,
        *,
        hostname: str | None = None,
        queue: QueueProbe | None = None,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.worker_id = worker_id
        self.hostname = hostname or socket.gethostname()
        self.version = duplex_version()
        self.started_monotonic = time.monotonic()
        self.claimed = Counter()  # namespace; written by the StepExecutor
        self.claimed_eagerly = Counter()  # namespace; by the CompletionProcessor (in commits)
        # Steps held by a concurrency key or deferred by a rate limit at this worker's claims:
        # (kind, key path or limit name); written by the StepExecutor.
        self.flow_waits = Counter()
        self.steps = StepMetrics()  # written by the CompletionProcessor
        self.schedules = ScheduleMetrics()  # written by the schedule firer's thread
        self.queue = queue
        self._draining = draining
        self._pool: HandlerPool | None = None
        self._buffer: CommitBuffer | None = None
        self._events: EventCounts | None = None

    def attach(self, *, pool: HandlerPool, buffer: CommitBuffer, events: EventCounts) -> None:
        """Read these from now on: the state the worker handed to its actors."""
        self._pool, self._buffer, self._events = pool, buffer, events

    def uptime_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    def draining(self) -> bool:
        return self._draining()

    def slots(self) -> SlotFigures | None:
        pool = self._pool
        if pool is None:
            return None
        return SlotFigures(
            total=pool.size,
            running=len(pool.running),
            free=len(pool.idle),
            waiting=len(pool.waiting),
            abandoned_threads=len(pool.abandoned),
            timeouts=pool.timeouts,
        )

    def commit(self) -> CommitFigures | None:
        buffer = self._buffer
        if buffer is None:
            return None
        return CommitFigures(buffer.held, buffer.batch_size, buffer.failing)

    def event_counts(self) -> dict[str, int] | None:
        return None if self._events is None else self._events.snapshot()

    def queue_figures(self) -> QueueFigures | None:
        """The queue figures (cached; see ``QueueProbe``), or None when unknown."""
        return None if self.queue is None else self.queue.figures()

    def ready_steps(self) -> int | None:
        figures = self.queue_figures()
        return None if figures is None else sum(figures.ready.values())


def worker_registry(metrics: WorkerMetrics) -> CollectorRegistry:
    """A registry of the worker's own, so that two workers embedded in one process never
    collide: its ``duplex_*`` metrics and the process's."""
    registry = CollectorRegistry()
    registry.register(DuplexCollector(metrics))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


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
        yield gauge(
            "duplex_worker_uptime_seconds", "Seconds since the worker started.", m.uptime_s()
        )
        yield gauge(
            "duplex_worker_draining", "1 while the worker is stopping.", float(m.draining())
        )
        claimed = m.claimed.snapshot()
        eager = m.claimed_eagerly.snapshot()
        for key, value in eager.items():
            claimed[key] = claimed.get(key, 0) + value
        yield counter(
            "duplex_steps_claimed",
            "Step attempts claimed by this worker.",
            ["namespace"],
            claimed,
        )
        yield counter(
            "duplex_steps_claimed_eagerly",
            "Of those, dependents claimed in the commit that made them ready.",
            ["namespace"],
            eager,
        )
        yield counter(
            "duplex_flow_control_waits",
            "Steps this worker's claims held back: by a concurrency key (its path) at its limit,"
            " or until a rate limit's tokens come.",
            ["kind", "name"],
            m.flow_waits.snapshot(),
        )
        steps = m.steps
        yield counter(
            "duplex_steps_succeeded",
            "Step attempts committed as succeeded.",
            ["namespace", "handler"],
            steps.succeeded.snapshot(),
        )
        yield counter(
            "duplex_steps_failed",
            "Step attempts committed as failed, by error_type.",
            ["namespace", "handler", "error_type"],
            steps.failed.snapshot(),
        )
        yield counter(
            "duplex_step_retries_scheduled",
            "Failed attempts whose step was scheduled for another attempt.",
            ["namespace", "handler"],
            steps.retries.snapshot(),
        )
        yield counter(
            "duplex_stale_claims_recovered",
            "Running attempts of dead workers recovered as worker_lost by this worker.",
            ["namespace"],
            steps.recovered.snapshot(),
        )
        yield counter(
            "duplex_late_results_rejected",
            "Results rejected by the commit guard (after a timeout or a recovery).",
            ["namespace"],
            steps.rejected.snapshot(),
        )
        yield counter(
            "duplex_task_deadlines_exceeded",
            "Tasks this worker cancelled at their deadline (max_duration).",
            ["namespace"],
            steps.deadlines_exceeded.snapshot(),
        )
        yield counter(
            "duplex_steps_cancelled_at_deadline",
            "Waiting steps cancelled because their task's deadline passed.",
            ["namespace"],
            steps.deadline_cancelled_steps.snapshot(),
        )
        yield histograms(
            "duplex_handler_duration_seconds",
            "How long handlers ran.",
            ["namespace", "handler"],
            steps.handler_seconds,
        )
        yield histograms(
            "duplex_claim_to_start_seconds",
            "From the claim to the handler's start (waiting for a slot).",
            ["namespace"],
            steps.claim_to_start,
        )
        yield histograms(
            "duplex_submit_to_start_seconds",
            "From the task's submission to the start of each of its steps' attempts.",
            ["namespace"],
            steps.submit_to_start,
        )
        yield histograms(
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
        yield counter(
            "duplex_commit_failures",
            "Commit transactions that failed (their results were kept).",
            [],
            {(): steps.commit_failures},
        )
        yield counter(
            "duplex_commit_retries",
            "Commit transactions tried again after a failure.",
            [],
            {(): steps.commit_retries},
        )
        yield from schedule_metrics(m.schedules)
        yield from self._pool_metrics()
        yield from self._buffer_metrics()
        yield from self._event_metrics()
        yield from self._queue_metrics()

    def _pool_metrics(self) -> Iterator[Metric]:
        slots = self._m.slots()
        if slots is None:
            return
        yield gauge("duplex_handler_slots", "Handler slots (max_concurrent_handlers).", slots.total)
        yield gauge("duplex_handlers_running", "Handlers running now.", slots.running)
        yield gauge("duplex_handler_slots_free", "Handler slots free now.", slots.free)
        yield gauge(
            "duplex_claims_waiting_for_slot", "Claimed steps waiting for a slot.", slots.waiting
        )
        yield gauge(
            "duplex_abandoned_threads",
            "Handler threads still stuck after their attempt timed out.",
            slots.abandoned_threads,
        )
        yield counter(
            "duplex_handler_timeouts",
            "Attempts timed out (each abandons a thread until its handler returns).",
            [],
            {(): slots.timeouts},
        )

    def _buffer_metrics(self) -> Iterator[Metric]:
        commit = self._m.commit()
        if commit is None:
            return
        yield gauge(
            "duplex_results_awaiting_commit",
            "Results (and releases) held for a commit.",
            commit.awaiting,
        )
        yield gauge(
            "duplex_commit_failing", "1 while commits fail and are retried.", float(commit.failing)
        )

    def _event_metrics(self) -> Iterator[Metric]:
        counts = self._m.event_counts()
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
            yield counter(name, text, [], {(): counts.get(key, 0)})
        yield gauge(
            "duplex_domain_events_queued", "Events waiting for delivery.", counts.get("queued", 0)
        )

    def _queue_metrics(self) -> Iterator[Metric]:
        figures = self._m.queue_figures()
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
        paused = GaugeMetricFamily(
            "duplex_paused",
            "1 for each namespace or template paused (`duplex pause`): its steps are not claimed.",
            labels=["kind", "name"],
        )
        for kind, name in figures.paused:
            paused.add_metric([kind, name], 1)
        yield paused
        yield from flow_gauges(figures)
        if figures.relay is not None:
            yield from _relay_metrics(figures.relay)


def _relay_metrics(lag: dict[str, Any]) -> Iterator[Metric]:
    yield gauge(
        "duplex_relay_unpublished_events",
        "Committed events the relay has not published yet (dead-lettered ones included).",
        lag["unpublished"],
    )
    yield gauge(
        "duplex_relay_dead_lettered_events",
        "Events that failed too often and wait for an operator (events retry or skip).",
        lag["dead_lettered"],
    )
    yield gauge(
        "duplex_relay_oldest_unpublished_age_seconds",
        "How long the oldest unpublished event has waited (0 when none waits).",
        lag["oldest_unpublished_age_s"] or 0.0,
    )
    yield gauge(
        "duplex_relay_published_per_second",
        "Events the broker confirmed, per second over the last minute.",
        lag["published_per_s"],
    )
