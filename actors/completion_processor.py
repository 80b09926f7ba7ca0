"""[5] CompletionProcessor: the completion channel; commits results, then announces them."""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import pykka
from loguru import logger

from duplex.actors.supervised import SupervisedActor, take_mailbox, tell
from duplex.clock import Timer, utcnow
from duplex.commit.buffer import CommitBuffer
from duplex.commit.retry import RetryPolicy
from duplex.dispatch.attempt import RESULT_UNSTORABLE, unstorable
from duplex.errors import StorageError
from duplex.messages import ClaimedStep, StepOutcome
from duplex.observability.logs import step_log
from duplex.observability.metrics import WorkerMetrics
from duplex.observability.tracing import StepTracer
from duplex.storage.claims import release_claims
from duplex.storage.db import Database
from duplex.storage.recovery import has_lost_claims, recover_lost_claims
from duplex.storage.results import CommitReport, commit_outcomes
from duplex.storage.workers import dead_local_workers
from duplex.worker.supervision import Supervisor

if TYPE_CHECKING:
    from duplex.actors.event_publisher import DomainEventPublisherProxy
    from duplex.actors.event_system import EventSystemProxy


class CommitObserver(Protocol):
    """Told about each committed batch, after the commit (metrics, tests)."""

    def __call__(self, report: CommitReport) -> None: ...


class CompletionProcessor(SupervisedActor):
    """Batch results, commit each batch in one transaction, then publish its events.

    Results arriving while a batch commits queue up in the mailbox and go into the next
    batch, so batches grow with load; ``linger_s`` (``worker.commit_linger_ms``) lets a batch
    gather for a few milliseconds more before it commits. If a commit fails, the batch is
    kept and retried with backoff, and none of its events are delivered.
    """

    def __init__(
        self,
        db: Database,
        publisher: DomainEventPublisherProxy,
        timer: Timer,
        *,
        policy: RetryPolicy,
        batch_size: int,
        claim_timeout_s: float,
        linger_s: float = 0.0,
        worker_id: str,
        observer: CommitObserver | None = None,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
        supervisor: Supervisor | None = None,
        metrics: WorkerMetrics | None = None,
        buffer: CommitBuffer | None = None,
        tracer: StepTracer | None = None,
    ) -> None:
        super().__init__(supervisor)
        self._tracer = tracer
        self._db = db
        self._publisher = publisher
        self._timer = timer
        self._policy = policy
        # Given by the worker, which reads it in place for its figures (no message).
        self._buffer = buffer if buffer is not None else CommitBuffer(batch_size, linger_s)
        self._metrics = metrics
        self._heartbeat_timeout = timedelta(seconds=claim_timeout_s)
        self._hostname = socket.gethostname()
        self._worker_id = worker_id
        self._observer = observer
        self._clock = clock
        self._rng = rng or random.Random()
        self._intake: EventSystemProxy | None = None
        self._self: CompletionProcessorProxy | None = None
        self.stats_counters = {
            "committed": 0,
            "rejected": 0,
            "released": 0,
            "commit_errors": 0,
            "recovered": 0,
        }

    def on_start(self) -> None:
        self._self = self.actor_ref.proxy()

    def connect(self, intake: EventSystemProxy) -> None:
        """Learn whom to nudge when commits make work ready."""
        self._intake = intake

    def submit(self, outcome: StepOutcome) -> None:
        """The completion channel: accept one attempt's outcome, fire-and-forget."""
        if self._buffer.add(outcome) and self._intake is not None:
            tell(self._intake.commits_lagging, True)
        self._schedule_flush()

    def release(self, steps: Sequence[ClaimedStep]) -> None:
        """Hand back claims that never started (the worker is stopping)."""
        self._buffer.add_releases(steps)
        self._schedule_flush()

    def flush(self) -> None:
        """Commit what is buffered, one transaction per batch."""
        self._buffer.flush_scheduled = False
        if not self._flush_batch():
            self._buffer.flush_scheduled = True
            if self._self is not None:
                delay = self._buffer.retry_delay()
                self._timer.call_later(delay, partial(tell, self._self.flush))
        else:
            self._schedule_flush()

    def drain(self, timeout_s: float) -> int:
        """The worker is stopping: commit everything held now, retrying failed commits for up
        to ``timeout_s``; return how many results (and releases) are still uncommitted."""
        end = time.monotonic() + timeout_s
        while self._buffer:
            if self._flush_batch():
                continue
            pause = min(self._buffer.retry_delay(), end - time.monotonic())
            if pause <= 0:
                break
            time.sleep(pause)
        return self._buffer.held

    def salvage(self) -> None:
        # This actor failed: take in the results still in its mailbox, try each batch once,
        # and count what could not be saved (those claims fall to the liveness rule).
        for message in take_mailbox(self):
            if message.attr_path == ("submit",):
                self._buffer.add(message.args[0])
            elif message.attr_path == ("release",):
                self._buffer.add_releases(message.args[0])
        while self._buffer and self._flush_batch():
            pass
        left = self._buffer.held
        if left:
            logger.error("{} result(s) could not be committed after the failure", left)
            self.supervisor.results_lost(left)

    def on_stop(self) -> None:
        # Stopped without a drain (the worker's stop was cut short): one last try.
        while self._buffer and self._flush_batch():
            pass

    def _flush_batch(self) -> bool:
        """Commit one batch; return False when the database failed (the batch is kept)."""
        batch, releases = self._buffer.next_batch()
        if not batch and not releases:
            return True
        if self._metrics is not None and self._buffer.failing:
            self._metrics.steps.commit_retries += 1
        try:
            report, released = self._commit(batch, releases)
        except StorageError as exc:
            # Only data the database refused is singled out; any other failure, passing or
            # not (a read-only database after a failover), keeps the batch and retries it.
            if not exc.refused or not batch:
                self._commit_failed(exc, len(batch) + len(releases))
                return False
            # The database refused something in this batch and would refuse it again: find
            # it by committing one outcome at a time, so it cannot hold up the others.
            return self._commit_one_by_one(batch)
        self._committed(len(batch), releases=True)
        self.stats_counters["released"] += released
        self._after_commit(report, work_ready=released > 0)
        return True

    def _commit(
        self, outcomes: Sequence[StepOutcome], releases: Sequence[ClaimedStep] = ()
    ) -> tuple[CommitReport, int]:
        now = self._clock()
        traced = self._tracer.commit(outcomes) if self._tracer else contextlib.nullcontext()
        with traced, self._db.write() as conn:
            report = commit_outcomes(conn, outcomes, policy=self._policy, now=now, rng=self._rng)
            released = release_claims(
                conn, releases, worker_id=self._worker_id, now=now, reason="released on stop"
            )
        return report, released

    def _commit_one_by_one(self, batch: Sequence[StepOutcome]) -> bool:
        for outcome in batch:
            try:
                try:
                    report, _ = self._commit([outcome])
                except StorageError as exc:
                    if not exc.refused:
                        raise
                    step_log(outcome.step).error(
                        "the database refused the result of step {} ({}); recording it as {}",
                        outcome.step.step_uuid,
                        exc,
                        RESULT_UNSTORABLE,
                    )
                    report, _ = self._commit([unstorable(outcome, exc)])
            except StorageError as exc:
                self._commit_failed(exc, self._buffer.held)
                return False
            self._committed(1)
            self._after_commit(report, work_ready=False)
        return True

    def _committed(self, count: int, *, releases: bool = False) -> None:
        """Drop ``count`` committed outcomes from the buffer; resume intake if it paused."""
        if self._buffer.committed(count, releases=releases) and self._intake is not None:
            tell(self._intake.commits_lagging, False)

    def recover_lost_claims(self) -> int:
        """Fail the running attempts of dead workers (``worker_lost``), so their steps run again."""
        now = self._clock()
        try:
            # Read first: this runs every second, and on SQLite a write transaction with
            # nothing to write would still make every commit of every worker wait for it.
            with self._db.read() as conn:
                dead = dead_local_workers(
                    conn,
                    hostname=self._hostname,
                    me=self._worker_id,
                    heartbeat_cutoff=now - self._heartbeat_timeout,
                )
                found = has_lost_claims(
                    conn,
                    me=self._worker_id,
                    heartbeat_timeout=self._heartbeat_timeout,
                    now=now,
                    dead_workers=dead,
                )
            if not found:
                return 0
            # The write reads again under its lock; the commit guard settles each attempt
            # once even when another worker recovers the same ones meanwhile.
            with self._db.write() as conn:
                report = recover_lost_claims(
                    conn,
                    me=self._worker_id,
                    heartbeat_timeout=self._heartbeat_timeout,
                    now=now,
                    policy=self._policy,
                    rng=self._rng,
                    dead_workers=dead,
                )
        except StorageError as exc:
            logger.warning("recovery of lost workers' claims failed: {}", exc)
            return 0
        if report.applied:
            lost = sorted({o.step.claimed_by or "?" for o in report.applied})
            logger.warning(
                "recovered {} running attempt(s) of lost worker(s) {}",
                len(report.applied),
                ", ".join(lost),
            )
            self.stats_counters["recovered"] += len(report.applied)
            self._after_commit(report, work_ready=False, recovery=True)
        return len(report.applied)

    def stats(self) -> dict[str, Any]:
        return {
            **self.stats_counters,
            "buffered": self._buffer.held,
            "commit_failing": self._buffer.failing,
        }

    def _after_commit(
        self, report: CommitReport, *, work_ready: bool, recovery: bool = False
    ) -> None:
        # Only now, with the transaction committed, may anyone hear about these results.
        if self._metrics is not None:
            self._metrics.steps.committed(report, self._clock(), recovery=recovery)
        self.stats_counters["committed"] += len(report.applied)
        self.stats_counters["rejected"] += len(report.rejected)
        for outcome in report.rejected:
            step_log(outcome.step).info(
                "late result for step {} attempt {} rejected (already settled)",
                outcome.step.step_uuid,
                outcome.step.attempt,
            )
        if self._observer is not None:
            try:
                self._observer(report)
            except Exception:
                # A hook that fails is logged; it must not stop results from being announced.
                logger.exception("commit observer failed")
        if report.events and not tell(self._publisher.publish, report.events):
            logger.warning(
                "{} committed event(s) not delivered in-process: the publisher is gone "
                "(they are in the domain_events table)",
                len(report.events),
            )
        if self._intake is not None:
            if report.enqueued or work_ready:
                tell(self._intake.nudge)
            if report.next_retry_at is not None:
                delay = (report.next_retry_at - self._clock()).total_seconds()
                self._timer.call_later(delay, partial(tell, self._intake.nudge))

    def _commit_failed(self, exc: StorageError, size: int) -> None:
        delay = self._buffer.failed()
        self.stats_counters["commit_errors"] += 1
        if self._metrics is not None:
            self._metrics.steps.commit_failures += 1
        logger.warning(
            "commit of {} result(s) failed ({}); kept, retrying in {:.2f}s", size, exc, delay
        )

    def _schedule_flush(self) -> None:
        if self._self is None:
            return
        delay = self._buffer.schedule()
        if delay is None:
            return
        if delay:
            self._timer.call_later(delay, partial(tell, self._self.flush))
        else:
            tell(self._self.flush)


CompletionProcessorProxy = pykka.ActorProxy[CompletionProcessor]
