"""The commit path's logic: commit what the buffer holds, and say what to announce after.

Plain code, no threads (like ``CommitBuffer``): the CompletionProcessor actor owns one
``Committer`` and turns what it returns into messages and timers.

* A batch of results (and every pending release) commits in one transaction. When it makes
  dependents ready, the same transaction claims some of them for this worker (eager dispatch,
  while ``eager_limit`` is set): at most one per result that completed a parent, at most
  ``eager_limit`` in all, only of this worker's namespaces. The others stay in the queue.
* A batch the database refuses (``StorageError.refused``: it would refuse it again) is
  committed one result at a time (claiming nothing eagerly), so the refused one cannot hold
  up the others; a result refused on its own is recorded as ``result_unstorable`` instead.
* Any other failure keeps the batch for a retry with backoff. A commit failed at its COMMIT
  may have gone through unheard: its eager claims are handed back first (``release_claims``).
* Running attempts of dead workers are failed as ``worker_lost`` (``recover_lost_claims``).
* Tasks past their deadline (``max_duration``) are expired: their waiting steps cancelled, the
  task cancelled (``sweep_deadlines``, and in the same transaction as a running attempt's
  ``task_deadline_exceeded`` failure, so its task's waiting steps do not wait for the sweep).
* Waits and sleeps whose time is up end; steps held by a key with room go (``sweep_waits``).
* Nothing is announced before its transaction committed: each commit yields an Announcement.
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from loguru import logger
from sqlalchemy import Connection

from duplex.commit.announcement import Announcement, Flush
from duplex.commit.buffer import CommitBuffer
from duplex.commit.retry import RetryPolicy
from duplex.commit.sweeps import sweep
from duplex.dispatch.attempt import unstorable
from duplex.errors import RESULT_UNSTORABLE, TASK_DEADLINE_EXCEEDED, StorageError
from duplex.messages import ClaimedStep, StepOutcome
from duplex.observability.logs import step_log
from duplex.observability.tracing import StepTracer
from duplex.storage.claim_order import DEFAULT_AGING
from duplex.storage.claims import claim_dependents
from duplex.storage.concurrency import ClaimHints, keys_with_room, sweep_held
from duplex.storage.db import Database
from duplex.storage.deadlines import ExpiredTask, expire_tasks, find_expired_tasks
from duplex.storage.recovery import has_lost_claims, recover_lost_claims
from duplex.storage.releases import release_claims
from duplex.storage.results import CommitReport, commit_outcomes
from duplex.storage.transitions import TransitionRow, insert_pending, insert_transitions
from duplex.storage.waits import end_due_waits, find_due_waits
from duplex.storage.workers import dead_local_workers, heartbeat_cutoff


class Committer:
    """Commit the buffer's batches and recover lost claims; count what happened."""

    def __init__(
        self,
        db: Database,
        buffer: CommitBuffer,
        *,
        policy: RetryPolicy,
        worker_id: str,
        claim_timeout_s: float,
        clock: Callable[[], datetime],
        rng: random.Random | None = None,
        tracer: StepTracer | None = None,
        hostname: str | None = None,
        namespaces: Sequence[str] = (),
        aging: timedelta = DEFAULT_AGING,
    ) -> None:
        self._db = db
        self._buffer = buffer
        self._policy = policy
        self._worker_id = worker_id
        self._claim_timeout_s = claim_timeout_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._tracer = tracer
        self._hostname = hostname or socket.gethostname()
        self._namespaces = tuple(namespaces)
        self._aging = aging  # worker.priority_aging_ms, for the claims made in a commit
        # How many dependents one commit may claim (0: none). The CompletionProcessor sets it
        # once it has a dispatch channel, and back to 0 when the worker stops its intake.
        self.eager_limit = 0
        # Eager claims of a commit whose COMMIT failed: it may have gone through unheard.
        self._unconfirmed: list[ClaimedStep] = []
        self.counts = {
            "committed": 0,
            "rejected": 0,
            "released": 0,
            "commit_errors": 0,
            "recovered": 0,
            "claimed_eagerly": 0,
            "deadlines_expired": 0,
        }

    def flush_batch(self, announce: Callable[[Announcement], None] | None = None) -> Flush:
        """Commit the buffer's next batch (a no-op when it is empty); ``announce`` is called
        with each announcement as soon as its commit is done."""
        batch, releases = self._buffer.next_batch()
        if not batch and not releases:
            return Flush()
        flush = Flush(retried=self._buffer.failing, announce=announce)
        try:
            report, released = self._commit(batch, releases, eager=True)
        except StorageError as exc:
            # Only data the database refused is singled out; any other failure, passing or
            # not (a read-only database after a failover), keeps the batch and retries it.
            if not exc.refused or not batch:
                self._failed(flush, exc, len(batch) + len(releases))
                return flush
            # The database refused something in this batch and would refuse it again: find
            # it by committing one outcome at a time, so it cannot hold up the others.
            self._commit_one_by_one(batch, flush)
            return flush
        caught_up = self._buffer.committed(len(batch), releases=True)
        self.counts["released"] += released
        flush.add(self._announcement(report, released > 0, caught_up))
        return flush

    def recover_lost_claims(self) -> Announcement | None:
        """Fail the running attempts of dead workers (``worker_lost``), so their steps run again.

        Returns what to announce, or None when nothing was recovered (or the database failed).
        """
        now = self._clock()
        cutoff = heartbeat_cutoff(now, self._claim_timeout_s)
        try:
            # Read first: this runs every second, and on SQLite a write transaction with
            # nothing to write would still make every commit of every worker wait for it.
            with self._db.read() as conn:
                dead = dead_local_workers(
                    conn,
                    hostname=self._hostname,
                    me=self._worker_id,
                    heartbeat_cutoff=cutoff,
                )
                found = has_lost_claims(
                    conn, me=self._worker_id, heartbeat_cutoff=cutoff, dead_workers=dead
                )
            if not found:
                return None
            # The write reads again under its lock; the commit guard settles each attempt
            # once even when another worker recovers the same ones meanwhile.
            with self._db.write() as conn:
                report = recover_lost_claims(
                    conn,
                    me=self._worker_id,
                    heartbeat_cutoff=cutoff,
                    now=now,
                    policy=self._policy,
                    rng=self._rng,
                    dead_workers=dead,
                )
        except StorageError as exc:
            logger.warning("recovery of lost workers' claims failed: {}", exc)
            return None
        if not report.applied:
            return None
        lost = sorted({o.step.claimed_by or "?" for o in report.applied})
        logger.warning(
            "recovered {} running attempt(s) of lost worker(s) {}",
            len(report.applied),
            ", ".join(lost),
        )
        self.counts["recovered"] += len(report.applied)
        return self._announcement(report, False, False, recovery=True)

    def sweep_deadlines(self) -> Announcement | None:
        """Expire the tasks past their deadline: cancel their waiting steps and the task.

        Returns what to announce, or None when nothing was due (or the database failed).
        """
        now, me = self._clock(), self._worker_id
        expiry = sweep(
            self._db, "deadlines", find_expired_tasks, expire_tasks, now=now, worker_id=me
        )
        if expiry is None or not expiry.expired:
            return None
        report = CommitReport(events=expiry.events, expired=expiry.expired)
        return self._announcement(report, False, False)

    def sweep_waits(self) -> Announcement | None:
        """End the waits and sleeps whose time is up (a sleep completes, a wait fails as
        ``wait_timeout``); let go of steps held by concurrency keys with room again."""
        now, me = self._clock(), self._worker_id
        ended = sweep(self._db, "waits", find_due_waits, end_due_waits, now=now, worker_id=me)
        held = sweep(self._db, "held steps", keys_with_room, sweep_held, now=now, worker_id=me)
        if (ended is None or not ended.ended) and not held:
            return None
        ready = [*(ended.ready if ended else []), *(held or [])]
        report = CommitReport(
            events=ended.events if ended else [], ready=ready, enqueued=len(ready)
        )
        return self._announcement(report, False, False)

    def _log_expired(self, expired: Sequence[ExpiredTask]) -> None:
        self.counts["deadlines_expired"] += len(expired)
        for task in expired:
            logger.bind(task_uuid=task.task_uuid).warning(
                "task {} passed its deadline ({}): {} waiting step(s) cancelled, {} running",
                task.task_uuid,
                task.deadline_at.isoformat(),
                len(task.cancelled_steps),
                task.running,
            )

    def _commit(
        self,
        outcomes: Sequence[StepOutcome],
        releases: Sequence[ClaimedStep] = (),
        *,
        eager: bool = False,
    ) -> tuple[CommitReport, int]:
        self._settle_unconfirmed()
        now = self._clock()
        traced = self._tracer.commit(outcomes) if self._tracer else contextlib.nullcontext()
        claimed: list[ClaimedStep] = []
        body_done = False
        try:
            with traced, self._db.write() as conn:
                transitions: list[TransitionRow] = []  # the results' and the claims': one insert
                report = commit_outcomes(
                    conn,
                    outcomes,
                    policy=self._policy,
                    now=now,
                    rng=self._rng,
                    transitions=transitions,
                )
                self._expire_with(conn, report, now, transitions)
                limit = min(report.parents_completed, self.eager_limit) if eager else 0
                if limit and report.ready:
                    hints = ClaimHints()
                    claimed = report.claimed = claim_dependents(
                        conn,
                        report.ready,
                        worker_id=self._worker_id,
                        namespaces=self._namespaces,
                        limit=limit,
                        now=now,
                        aging=self._aging,
                        hints=hints,
                        transitions=transitions,
                    )
                    report.next_retry_at = hints.look_by(report.next_retry_at)
                insert_transitions(conn, transitions)
                released = release_claims(
                    conn, releases, worker_id=self._worker_id, now=now, reason="released on stop"
                )
                body_done = True
        except StorageError:
            if body_done:
                # The COMMIT itself failed: it may have gone through unheard, claims included.
                self._unconfirmed.extend(claimed)
            raise
        self.counts["claimed_eagerly"] += len(claimed)
        return report, released

    def _expire_with(
        self,
        conn: Connection,
        report: CommitReport,
        now: datetime,
        transitions: list[TransitionRow],
    ) -> None:
        """Expire, in the commit's transaction, the tasks of its deadline failures (before any
        dependent is claimed: those of an expired task are cancelled instead)."""
        tasks = {
            outcome.step.task_uuid
            for outcome in report.applied
            if outcome.failure is not None and outcome.failure.error_type == TASK_DEADLINE_EXCEEDED
        }
        if not tasks:
            return
        insert_pending(conn, transitions)  # the expiry writes its rows: the commit's go first
        expiry = expire_tasks(conn, tasks, now=now, worker_id=self._worker_id)
        report.events.extend(expiry.events)
        # A dependent this batch enqueued in an expired task is cancelled now: the claim that
        # follows skips it (its update is guarded by state).
        report.expired.extend(expiry.expired)

    def _settle_unconfirmed(self) -> None:
        """Hand back the eager claims of a commit that may have gone through unheard.

        Before any other transaction of this path: a later commit could make the same steps
        ready again and claim the same attempts, which this hand-back must not touch.
        """
        if not self._unconfirmed:
            return
        try:
            with self._db.write() as conn:
                released = release_claims(
                    conn,
                    self._unconfirmed,
                    worker_id=self._worker_id,
                    now=self._clock(),
                    reason="eager claim not confirmed (connection lost)",
                )
        except StorageError as exc:
            # Never blamed on a result of the batch that follows (``refused``).
            raise StorageError(str(exc), transient=exc.transient) from exc
        self._unconfirmed = []
        if released:
            logger.warning(
                "a commit reported as failed had committed; handed back {} step(s)", released
            )

    def _commit_one_by_one(self, batch: Sequence[StepOutcome], flush: Flush) -> None:
        for outcome in batch:
            try:
                report = self._commit_alone(outcome)
            except StorageError as exc:
                self._failed(flush, exc, self._buffer.held)
                return
            caught_up = self._buffer.committed(1, releases=False)
            flush.add(self._announcement(report, False, caught_up))

    def _commit_alone(self, outcome: StepOutcome) -> CommitReport:
        """Commit one outcome; one the database refuses is recorded as unstorable instead."""
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
        return report

    def _failed(self, flush: Flush, exc: StorageError, size: int) -> None:
        flush.failed = True
        flush.retry_in_s = self._buffer.failed()
        self.counts["commit_errors"] += 1
        logger.warning(
            "commit of {} result(s) failed ({}); kept, retrying in {:.2f}s",
            size,
            exc,
            flush.retry_in_s,
        )

    def _announcement(
        self, report: CommitReport, work_ready: bool, caught_up: bool, *, recovery: bool = False
    ) -> Announcement:
        self.counts["committed"] += len(report.applied)
        if report.expired:
            self._log_expired(report.expired)
        self.counts["rejected"] += len(report.rejected)
        for outcome in report.rejected:
            step_log(outcome.step).info(
                "late result for step {} attempt {} rejected (already settled)",
                outcome.step.step_uuid,
                outcome.step.attempt,
            )
        retry_due_in_s = None
        if report.next_retry_at is not None:
            retry_due_in_s = (report.next_retry_at - self._clock()).total_seconds()
        return Announcement(
            report,
            # Dependents claimed here run at once; the intake looks for the others.
            wake_intake=report.enqueued > len(report.claimed) or work_ready,
            retry_due_in_s=retry_due_in_s,
            caught_up=caught_up,
            recovery=recovery,
        )
