"""[5] CompletionProcessor: the completion channel; commits results, then announces them.

A commit that makes dependents ready may claim some of them for this worker in the same
transaction (``Committer``); this actor hands those straight to the Dispatcher after the
commit, through ``DispatchChannel`` (a call back up the flow, like the intake's reports).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol

from loguru import logger

from duplex.actors.event_publisher import DomainEventPublisherProxy
from duplex.actors.ports import CommitSignals, DispatchChannel
from duplex.actors.proxy import TypedProxy, message
from duplex.actors.supervised import SupervisedActor, take_mailbox, tell
from duplex.clock import Timer, utcnow
from duplex.commit.announcement import Announcement
from duplex.commit.buffer import CommitBuffer
from duplex.commit.committer import Committer
from duplex.commit.retry import RetryPolicy
from duplex.commit.sweeps import find_cancels
from duplex.messages import ClaimedStep, StepOutcome
from duplex.observability.metrics import WorkerMetrics
from duplex.observability.tracing import StepTracer
from duplex.storage.claim_order import DEFAULT_AGING
from duplex.storage.db import Database
from duplex.storage.results import CommitReport
from duplex.worker.supervision import Supervisor


class CommitObserver(Protocol):
    """Called with the report of each commit, recoveries included, once it has committed and
    before its events are published (``Worker(observer=...)``)."""

    def __call__(self, report: CommitReport) -> None: ...


class CompletionProcessor(SupervisedActor):
    """Batch results, commit each batch in one transaction, then publish its events.

    Group commit: a lone result commits at once; results arriving while a batch commits
    queue up in the mailbox and go into the next batch, so batches grow with load. Under load
    (the last batch held several results) ``linger_s`` (``worker.commit_linger_ms``) lets a
    batch gather up to as many for at most a few milliseconds more (``CommitBuffer``). If a
    commit fails, the batch is kept and retried with backoff, and none of its events are
    delivered.

    Eager dispatch (``eager_limit`` > 0, once ``connect`` gave a dispatch channel, until
    ``stop_eager_claims``): the dependents a commit claimed go to the Dispatcher right after
    it, and the intake counts them as claims.

    What to commit and how is ``Committer``'s (``duplex.commit.committer``); this actor owns
    the mailbox, the timers and the announcing that follows each commit.
    """

    def __init__(
        self,
        db: Database,
        publisher: DomainEventPublisherProxy,
        timer: Timer,
        *,
        buffer: CommitBuffer,
        policy: RetryPolicy,
        claim_timeout_s: float,
        worker_id: str,
        observer: CommitObserver | None = None,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
        supervisor: Supervisor | None = None,
        metrics: WorkerMetrics | None = None,
        tracer: StepTracer | None = None,
        namespaces: Sequence[str] = (),
        eager_limit: int = 0,
        priority_aging: timedelta = DEFAULT_AGING,
    ) -> None:
        super().__init__(supervisor)
        self._db = db  # for the read of cancelled attempts (the Committer writes)
        self._worker_id = worker_id
        self._publisher = publisher
        self._timer = timer
        # Given by the worker, which reads it in place for its figures (no message).
        self._buffer = buffer
        self._metrics = metrics
        self._committer = Committer(
            db,
            buffer,
            policy=policy,
            worker_id=worker_id,
            claim_timeout_s=claim_timeout_s,
            clock=clock,
            rng=rng,
            tracer=tracer,
            namespaces=namespaces,
            aging=priority_aging,
        )
        self._eager_limit = eager_limit
        self._dispatcher: DispatchChannel | None = None
        # Eagerly claimed steps between their commit and the Dispatcher (for ``salvage``).
        self._unsent: list[ClaimedStep] = []
        self._observer = observer
        self._clock = clock
        self._intake: CommitSignals | None = None
        self._self: CompletionProcessorProxy | None = None

    def on_start(self) -> None:
        self._self = CompletionProcessorProxy.of(self.actor_ref)

    def connect(self, intake: CommitSignals, dispatcher: DispatchChannel | None = None) -> None:
        """Learn whom to nudge when commits make work ready, and where to send the dependents
        a commit claims (without a ``dispatcher``, commits claim none)."""
        self._intake = intake
        self._dispatcher = dispatcher
        self._committer.eager_limit = self._eager_limit if dispatcher is not None else 0

    def stop_eager_claims(self) -> None:
        """Claim no more dependents in commits (the worker stopped its intake)."""
        self._committer.eager_limit = 0

    def submit(self, outcome: StepOutcome) -> None:
        """The completion channel: accept one attempt's outcome, fire-and-forget."""
        if self._buffer.add(outcome) and self._intake is not None:
            tell(self._intake.commits_lagging, True)
        self._schedule_flush()

    def release(self, steps: Sequence[ClaimedStep]) -> None:
        """Hand back claims that never started (the worker is stopping)."""
        self._buffer.add_releases(steps)
        self._schedule_flush()

    def flush(self, round: int) -> None:
        """Commit what is buffered, one transaction per batch (commit ``round`` of the
        buffer's schedule; a round already committed is ignored)."""
        if not self._buffer.due(round):
            return
        if not self._flush_batch():
            retry = self._buffer.schedule_retry()
            if self._self is not None:
                delay = self._buffer.retry_delay()
                self._timer.call_later(delay, partial(tell, self._self.flush, retry))
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
        # and count what could not be saved (those claims fall to the liveness rule). Steps
        # claimed by a commit but not handed on go back to the queue with them.
        self._buffer.add_releases(self._unsent)
        self._unsent = []
        for call in take_mailbox(self):
            if call.attr_path == ("submit",):
                self._buffer.add(call.args[0])
            elif call.attr_path == ("release",):
                self._buffer.add_releases(call.args[0])
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
        flush = self._committer.flush_batch(announce=self._announce)
        if self._metrics is not None:
            if flush.retried:
                self._metrics.steps.commit_retries += 1
            if flush.failed:
                self._metrics.steps.commit_failures += 1
        return flush.ok

    def recover_lost_claims(self) -> int:
        """Fail the running attempts of dead workers (``worker_lost``), so their steps run again."""
        announcement = self._committer.recover_lost_claims()
        if announcement is None:
            return 0
        self._announce(announcement)
        return len(announcement.report.applied)

    def sweep_deadlines(self) -> int:
        """Expire the tasks past their deadline (``max_duration``), end the waits and sleeps
        whose time is up, and have the Dispatcher cancel the running attempts an operator
        cancelled (the watchdog's one timed sweep); return how many tasks expired."""
        expired = 0
        announcement = self._committer.sweep_deadlines()
        if announcement is not None:
            self._announce(announcement)
            expired = len(announcement.report.expired)
        # After the deadlines: a wait of a task that just expired was cancelled with it.
        waits = self._committer.sweep_waits()
        if waits is not None:
            self._announce(waits)
        # Without a dispatch channel (not connected yet, or a test's bare processor) there is
        # nothing running here to cancel.
        if self._dispatcher is not None:
            cancels = find_cancels(self._db, worker_id=self._worker_id)
            if cancels:
                tell(self._dispatcher.cancel_attempts, cancels)
        return expired

    def stats(self) -> dict[str, Any]:
        return {
            **self._committer.counts,
            "buffered": self._buffer.held,
            "commit_failing": self._buffer.failing,
        }

    def _announce(self, announcement: Announcement) -> None:
        # Only now, with the transaction committed, may anyone hear about these results.
        report = announcement.report
        if announcement.claimed:
            self._hand_on(announcement.claimed)
        if announcement.caught_up and self._intake is not None:
            tell(self._intake.commits_lagging, False)
        if self._metrics is not None:
            self._metrics.steps.committed(report, self._clock(), recovery=announcement.recovery)
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
            if announcement.wake_intake:
                tell(self._intake.nudge)
            if announcement.retry_due_in_s is not None:
                self._timer.call_later(
                    announcement.retry_due_in_s, partial(tell, self._intake.nudge)
                )

    def _hand_on(self, steps: list[ClaimedStep]) -> None:
        """Send the dependents a commit claimed to the Dispatcher, as the StepExecutor does."""
        self._unsent = steps
        if self._metrics is not None:
            for step in steps:
                self._metrics.claimed_eagerly.inc((step.namespace,))
        # The intake hears first: the credits these steps give back when they end (through the
        # Dispatcher) must not reach it before it counted them as taken.
        if self._intake is not None:
            tell(self._intake.claimed_eagerly, len(steps))
        if self._dispatcher is None or not tell(self._dispatcher.dispatch, steps):
            # The Dispatcher died (the worker is stopping): back to the queue, committed like
            # the Dispatcher's own releases.
            logger.warning("{} claimed step(s) handed back: the dispatcher is gone", len(steps))
            self._buffer.add_releases(steps)
            self._schedule_flush()
        self._unsent = []

    def _schedule_flush(self) -> None:
        if self._self is None:
            return
        delay = self._buffer.schedule()
        if delay is None:
            # A commit is scheduled; one that lingers goes now if it has what it waited for.
            if self._buffer.gathered():
                tell(self._self.flush, self._buffer.round)
            return
        if delay:
            self._timer.call_later(delay, partial(tell, self._self.flush, self._buffer.round))
        else:
            tell(self._self.flush, self._buffer.round)


class CompletionProcessorProxy(TypedProxy[CompletionProcessor]):
    """The CompletionProcessor's messages."""

    connect = message(CompletionProcessor.connect)
    stop_eager_claims = message(CompletionProcessor.stop_eager_claims)
    submit = message(CompletionProcessor.submit)
    release = message(CompletionProcessor.release)
    flush = message(CompletionProcessor.flush)
    drain = message(CompletionProcessor.drain)
    recover_lost_claims = message(CompletionProcessor.recover_lost_claims)
    sweep_deadlines = message(CompletionProcessor.sweep_deadlines)
    stats = message(CompletionProcessor.stats)
