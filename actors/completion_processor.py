"""[5] CompletionProcessor: the completion channel; commits results, then announces them."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

import pykka
from loguru import logger

from app.claims import release_claims
from app.commits import CommitReport, commit_outcomes, recover_stale_claims
from app.db import Database
from app.errors import StorageError
from app.execution import RESULT_UNSTORABLE, unstorable
from app.messages import ClaimedStep, StepOutcome
from app.models import utcnow
from app.retry import RetryPolicy
from app.timer import Timer

if TYPE_CHECKING:
    from actors.event_publisher import DomainEventPublisherProxy
    from actors.event_system import EventSystemProxy


class CommitObserver(Protocol):
    """Told about each committed batch, after the commit (metrics, tests)."""

    def __call__(self, report: CommitReport) -> None: ...


class CompletionProcessor(pykka.ThreadingActor):
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
    ) -> None:
        super().__init__()
        self._db = db
        self._publisher = publisher
        self._timer = timer
        self._policy = policy
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._claim_timeout = timedelta(seconds=claim_timeout_s)
        self._worker_id = worker_id
        self._observer = observer
        self._clock = clock
        self._rng = rng or random.Random()
        self._outcomes: list[StepOutcome] = []
        self._releases: list[ClaimedStep] = []
        self._flush_pending = False
        self._failures_in_a_row = 0
        self._lagging = False
        self._intake: EventSystemProxy | None = None
        self._self: CompletionProcessorProxy | None = None
        self.stats_counters = {"committed": 0, "rejected": 0, "released": 0, "commit_errors": 0}

    def on_start(self) -> None:
        self._self = self.actor_ref.proxy()

    def connect(self, intake: EventSystemProxy) -> None:
        """Learn whom to nudge when commits make work ready."""
        self._intake = intake

    def submit(self, outcome: StepOutcome) -> None:
        """The completion channel: accept one attempt's outcome, fire-and-forget."""
        self._outcomes.append(outcome)
        if not self._lagging and len(self._outcomes) >= self._batch_size:
            self._lagging = True
            if self._intake is not None:
                self._intake.commits_lagging.defer(True)
        self._schedule_flush()

    def release(self, steps: Sequence[ClaimedStep]) -> None:
        """Hand back claims that never started (the worker is stopping)."""
        self._releases.extend(steps)
        self._schedule_flush()

    def flush(self) -> None:
        """Commit what is buffered, one transaction per batch."""
        self._flush_pending = False
        batch = self._outcomes[: self._batch_size]
        releases = list(self._releases)
        if not batch and not releases:
            return
        try:
            report, released = self._commit(batch, releases)
        except StorageError as exc:
            if exc.transient or not batch:
                self._commit_failed(exc, len(batch) + len(releases))
                return
            # The database refused something in this batch and would refuse it again: find
            # it by committing one outcome at a time, so it cannot hold up the others.
            self._commit_one_by_one(batch)
            return
        self._committed(len(batch))
        self._releases.clear()
        self.stats_counters["released"] += released
        self._after_commit(report, work_ready=released > 0)

    def _commit(
        self, outcomes: Sequence[StepOutcome], releases: Sequence[ClaimedStep] = ()
    ) -> tuple[CommitReport, int]:
        now = self._clock()
        with self._db.write() as conn:
            report = commit_outcomes(conn, outcomes, policy=self._policy, now=now, rng=self._rng)
            released = release_claims(
                conn, releases, worker_id=self._worker_id, now=now, reason="released on stop"
            )
        return report, released

    def _commit_one_by_one(self, batch: Sequence[StepOutcome]) -> None:
        for outcome in batch:
            try:
                try:
                    report, _ = self._commit([outcome])
                except StorageError as exc:
                    if exc.transient:
                        raise
                    logger.error(
                        "the database refused the result of step {} ({}); recording it as {}",
                        outcome.step.step_uuid,
                        exc,
                        RESULT_UNSTORABLE,
                    )
                    report, _ = self._commit([unstorable(outcome, exc)])
            except StorageError as exc:
                self._commit_failed(exc, len(self._outcomes))
                return
            self._committed(1)
            self._after_commit(report, work_ready=False)
        self._schedule_flush()

    def _committed(self, count: int) -> None:
        """Drop ``count`` committed outcomes from the buffer; resume intake if it paused."""
        self._failures_in_a_row = 0
        del self._outcomes[:count]
        if self._lagging and len(self._outcomes) <= self._batch_size // 2:
            self._lagging = False
            if self._intake is not None:
                self._intake.commits_lagging.defer(False)
        if self._outcomes:
            self._schedule_flush()

    def recover_stale_claims(self) -> int:
        """Fail attempts of workers that stopped heart-beating, so their steps run again."""
        try:
            with self._db.write() as conn:
                report = recover_stale_claims(
                    conn,
                    claim_timeout=self._claim_timeout,
                    now=self._clock(),
                    policy=self._policy,
                    rng=self._rng,
                )
        except StorageError as exc:
            logger.warning("stale-claim recovery failed: {}", exc)
            return 0
        if report.applied:
            logger.warning("recovered {} stale claim(s) of lost workers", len(report.applied))
        self._after_commit(report, work_ready=False)
        return len(report.applied)

    def stats(self) -> dict[str, Any]:
        return {
            **self.stats_counters,
            "buffered": len(self._outcomes) + len(self._releases),
            "commit_failing": self._failures_in_a_row > 0,
        }

    def _after_commit(self, report: CommitReport, *, work_ready: bool) -> None:
        # Only now, with the transaction committed, may anyone hear about these results.
        self.stats_counters["committed"] += len(report.applied)
        self.stats_counters["rejected"] += len(report.rejected)
        for outcome in report.rejected:
            logger.info(
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
        if report.events:
            self._publisher.publish.defer(report.events)
        if self._intake is not None:
            if report.enqueued or work_ready:
                self._intake.nudge.defer()
            if report.next_retry_at is not None:
                delay = (report.next_retry_at - self._clock()).total_seconds()
                self._timer.call_later(delay, self._intake.nudge.defer)

    def _commit_failed(self, exc: StorageError, size: int) -> None:
        self._failures_in_a_row += 1
        self.stats_counters["commit_errors"] += 1
        delay = min(5.0, 0.05 * 2 ** min(self._failures_in_a_row - 1, 10))
        logger.warning(
            "commit of {} result(s) failed ({}); kept, retrying in {:.2f}s", size, exc, delay
        )
        self._flush_pending = True
        if self._self is not None:
            self._timer.call_later(delay, self._self.flush.defer)

    def _schedule_flush(self) -> None:
        if self._flush_pending or self._self is None:
            return
        self._flush_pending = True
        if self._linger_s and len(self._outcomes) < self._batch_size:
            # Let a few more results join the batch: one transaction for several results
            # costs far less than one each, and the slots are already free (guarantee 4).
            self._timer.call_later(self._linger_s, self._self.flush.defer)
        else:
            self._self.flush.defer()


CompletionProcessorProxy = pykka.ActorProxy[CompletionProcessor]
