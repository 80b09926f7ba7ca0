"""The outbox relay: committed domain events to the broker, in order, at least once.

``Relay`` is plain code with no thread of its own: ``pump()`` publishes what is due, batch by
batch, and returns how long to wait before the next pump. The worker runs it in an actor
(``actors/relay.py``), ``duplex relay`` on its main thread. What makes the guarantees:

* **Never publish uncommitted.** The relay reads ``domain_events`` through its own
  connection, so it only sees committed rows.
* **At-least-once.** A row is marked ``published_at`` only after the broker confirmed it;
  a crash between the two publishes it again, with the same ``message_id``.
* **No copy for a database fault.** When the marking fails (the connection is terminated,
  the database restarts, SQLite stays locked), the relay keeps the batch's outcome in memory
  and records it first, on a new connection, before it selects or publishes anything else:
  what the broker confirmed is not published again by this relay. So at most one batch is
  ever confirmed and not yet marked, which bounds the copies any fault can cause.
* **Per-task order.** Each batch is one run per task, from the task's head, published in
  sequence order and cut at the first failure; on PostgreSQL the head's row lock is held
  from selection to marking (``duplex.storage.outbox``), on SQLite a file lock lets one relay at
  a time publish (``duplex.events.relay_lock``). The plain logic of one batch (messages, runs
  cut at a refusal, failures, backoff) is in ``duplex.events.publishing``.
* **Faults.** A broker that is down or drops the connection costs nothing but time: the
  relay backs off (``backoff_base_ms`` doubling to ``backoff_max_ms``), reconnects and starts
  again from the rows. A refusal of one message (nack, or unroutable in ``unroutable =
  "retry"`` mode) counts against that event; after ``max_attempts`` it is dead-lettered with
  its error and its task's later events wait until ``duplex events retry|skip``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from loguru import logger

from duplex.clock import utcnow
from duplex.errors import BrokerUnavailableError, StorageError
from duplex.events.broker import safe_url
from duplex.events.publishing import (
    Backoff,
    BatchOutcome,
    Publisher,
    publish_failure,
    publish_runs,
)
from duplex.events.relay_lock import RelayLock
from duplex.settings import RelaySettings
from duplex.storage.db import Database
from duplex.storage.outbox import (
    OutboxEvent,
    PublishFailure,
    event_lag,
    mark_published,
    pending_runs,
    record_failures,
)


@dataclass
class RelayStats:
    """Counters of one relay, since it started."""

    published: int = 0
    failed_attempts: int = 0
    dead_lettered: int = 0
    unroutable: int = 0
    broker_errors: int = 0
    batches: int = 0


class Relay:
    """Publish committed events, batch by batch; see the module docstring."""

    def __init__(
        self,
        db: Database,
        settings: RelaySettings,
        *,
        connect: Callable[[], Publisher],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.settings = settings
        self._connect = connect
        self._clock = clock
        self._publisher: Publisher | None = None
        self._lock = RelayLock(db)
        self._broker_backoff = Backoff(
            settings.backoff_base_ms / 1000, settings.backoff_max_ms / 1000
        )
        self._event_backoff = Backoff(
            settings.backoff_base_ms / 1000, settings.backoff_max_ms / 1000
        )
        self._database_backoff = Backoff(
            settings.backoff_base_ms / 1000, settings.backoff_max_ms / 1000
        )
        # A batch the broker confirmed (in part) whose marking the database refused.
        self._unrecorded: BatchOutcome | None = None
        self._down_since: float | None = None
        self._next_connect = 0.0  # monotonic time before which no connect is tried
        self._standby_logged = False
        self.stats = RelayStats()
        self._rate: deque[tuple[float, int]] = deque()
        self._stats_lock = threading.Lock()

    @property
    def poll_s(self) -> float:
        return self.settings.poll_interval_ms / 1000

    @property
    def connected(self) -> bool:
        return self._publisher is not None and self._publisher.usable

    def pump(self, *, budget_s: float = 0.25) -> float:
        """Publish what is due for up to about ``budget_s``; return the wait before the next.

        0 means more is due at once; the poll interval means nothing is due (a wake-up from
        the commit path or a NOTIFY may come sooner).
        """
        if not self._lock.try_acquire():
            if not self._standby_logged:
                logger.info("another relay publishes from this SQLite database; standing by")
                self._standby_logged = True
            return self.poll_s
        if self._unrecorded is not None and not self._record_unrecorded():
            return self._database_backoff.failed()
        publisher = self._ensure_connected()
        if publisher is None:
            return max(0.001, self._next_connect - time.monotonic())
        deadline = time.monotonic() + budget_s
        retries: list[float] = []
        while True:
            try:
                outcome = self.run_batch(publisher)
            except StorageError as exc:
                unmarked = self._unrecorded.published if self._unrecorded else []
                logger.warning(
                    "relay: {}; retrying{}",
                    exc,
                    f", {len(unmarked)} confirmed event(s) to mark first" if unmarked else "",
                )
                return self._database_backoff.failed()
            self._database_backoff.reset()
            if outcome.broker_error is not None:
                return self._broker_lost(outcome.broker_error)
            retries += [
                self._event_backoff.delay(f.attempts)
                for f in outcome.failures
                if not f.dead_lettered
            ]
            if outcome.selected < self.settings.batch_size:
                break  # drained what is due now
            if time.monotonic() >= deadline:
                return 0.0  # more is due; let the mailbox in first
        if not outcome.selected:
            try:
                publisher.keepalive()
            except BrokerUnavailableError as exc:
                return self._broker_lost(exc)
        # An event that failed is due again after its backoff: look again then.
        return min([self.poll_s, *retries])

    def run_batch(self, publisher: Publisher) -> BatchOutcome:
        """Select one batch, publish it, record the outcome (see ``duplex.storage.outbox``).

        A ``StorageError`` after the publishing leaves the outcome for ``pump`` to record
        before anything else (``_record_unrecorded``).
        """
        assert self._unrecorded is None, "an unrecorded batch must be recorded first"
        limit = self.settings.batch_size
        outcome = BatchOutcome()
        try:
            if self.db.is_sqlite:
                # Held under RelayLock: no other relay publishes meanwhile, so the read and
                # the marking need not share a transaction (which would hold SQLite's writer
                # lock for the whole round trip to the broker).
                with self.db.read() as conn:
                    runs = pending_runs(conn, limit=limit, now=self._clock(), lock=False)
                outcome = self._publish(runs, publisher)
                if outcome.published or outcome.failures:
                    with self.db.write() as conn:
                        self._record(conn, outcome)
            else:
                with self.db.write() as conn:
                    runs = pending_runs(conn, limit=limit, now=self._clock(), lock=True)
                    outcome = self._publish(runs, publisher)
                    self._record(conn, outcome)
        except StorageError:
            if outcome.published or outcome.failures:
                self._unrecorded = outcome
            raise
        self._count(outcome)
        return outcome

    def _record_unrecorded(self) -> bool:
        """Record the batch a database error left unmarked; False while the database fails.

        In a transaction of its own: on PostgreSQL the batch's row locks went with the failed
        one, so another relay may meanwhile publish these events again (the one case of a
        copy a database fault can still cause); recording is idempotent, whoever marks first.
        """
        outcome = self._unrecorded
        assert outcome is not None
        try:
            with self.db.write() as conn:
                self._record(conn, outcome)
        except StorageError as exc:
            logger.warning(
                "relay: {}; {} confirmed event(s) still to mark, nothing is published "
                "before they are",
                exc,
                len(outcome.published),
            )
            return False
        self._unrecorded = None
        self._database_backoff.reset()
        self._count(outcome)
        logger.info(
            "relay: marked {} event(s) confirmed before the database error", len(outcome.published)
        )
        return True

    def _publish(self, runs: Sequence[Sequence[OutboxEvent]], publisher: Publisher) -> BatchOutcome:
        return publish_runs(
            runs,
            publisher,
            unroutable_as_published=self.settings.unroutable == "published",
            failure=self._failure,
        )

    def _failure(self, event: OutboxEvent, error: str) -> PublishFailure:
        return publish_failure(
            event,
            error,
            max_attempts=self.settings.max_attempts,
            backoff=self._event_backoff,
            clock=self._clock,
        )

    def _record(self, conn: Any, outcome: BatchOutcome) -> None:
        now = self._clock()
        mark_published(conn, outcome.published, now=now)
        record_failures(conn, outcome.failures, now=now)

    def _count(self, outcome: BatchOutcome) -> None:
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.published += len(outcome.published)
            self.stats.unroutable += outcome.unroutable
            self.stats.failed_attempts += len(outcome.failures)
            self.stats.dead_lettered += sum(1 for f in outcome.failures if f.dead_lettered)
            if outcome.published:
                self._rate.append((time.monotonic(), len(outcome.published)))

    def _ensure_connected(self) -> Publisher | None:
        if self._publisher is not None and self._publisher.usable:
            return self._publisher
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        if time.monotonic() < self._next_connect:
            return None  # backing off: wake-ups from commits must not hammer the broker
        try:
            self._publisher = self._connect()
        except BrokerUnavailableError as exc:
            self._next_connect = time.monotonic() + self._broker_backoff.failed()
            if self._down_since is None:
                self._down_since = time.monotonic()
                logger.warning(
                    "relay cannot reach the broker at {} ({}); retrying every {:g}s at most",
                    self._where(),
                    exc,
                    self.settings.backoff_max_ms / 1000,
                )
            return None
        if self._down_since is not None:
            logger.info(
                "relay reconnected to {} after {:.1f}s",
                self._where(),
                time.monotonic() - self._down_since,
            )
        else:
            logger.info(
                "relay connected to {}, exchange {!r}", self._where(), self.settings.exchange
            )
        self._down_since = None
        self._broker_backoff.reset()
        return self._publisher

    def _broker_lost(self, exc: BrokerUnavailableError) -> float:
        """Drop the connection; return the backoff before the next connect."""
        with self._stats_lock:
            self.stats.broker_errors += 1
        logger.warning("relay lost the broker ({}); reconnecting", exc)
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        if self._down_since is None:
            self._down_since = time.monotonic()
        delay = self._broker_backoff.failed()
        self._next_connect = time.monotonic() + delay
        return delay

    def _where(self) -> str:
        try:
            return safe_url(self.settings.url)
        except Exception:
            return "the configured URL"

    def snapshot(self) -> dict[str, Any]:
        """The counters, whether the broker is connected, and the publish rate (last 10 s)."""
        with self._stats_lock:
            now = time.monotonic()
            while self._rate and self._rate[0][0] < now - 10:
                self._rate.popleft()
            rate = sum(n for _, n in self._rate) / 10
            return {
                **self.stats.__dict__,
                "connected": self.connected,
                "lock_held": self._lock.held,
                "published_per_s": round(rate, 1),
            }

    def lag(self) -> dict[str, Any] | None:
        """Unpublished and dead-lettered counts, the oldest unpublished age, the rate."""
        try:
            with self.db.read() as conn:
                now = self._clock()
                return event_lag(conn, now=now).as_json(now)
        except StorageError:
            return None

    def close(self) -> None:
        if self._unrecorded is not None and not self._record_unrecorded():
            logger.warning(
                "relay: stopping with {} confirmed event(s) unmarked; the next relay publishes "
                "them again (same message ids)",
                len(self._unrecorded.published),
            )
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        self._lock.release()
