"""The outbox: sequence numbers, the relay's work list and its bookkeeping, the lag figures.

Operators' reads and commands on these rows (``duplex events``) are in
``duplex.storage.event_operations``, retention (``duplex prune``) in ``duplex.storage.retention``,
the ``duplex_events`` NOTIFY in ``duplex.storage.listen``.

**Why a task's events leave in sequence order, with several relays on PostgreSQL.**

1. Sequences follow commit order. ``next_sequences`` runs after the commit path locked the
   task rows (``lock_tasks``: ``FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so
   the previous writer of the task has committed and its events are visible to the statement
   (READ COMMITTED takes a new snapshot per statement). A task's events therefore become
   visible in sequence order: whoever sees sequence n sees 1..n-1. (Were the lock ever
   bypassed, the unique index on (task_uuid, sequence) would fail the commit, not reorder.)
2. An event leaves the work list (``published_at`` or ``skipped_at`` set) and never comes
   back; new events get higher numbers. So a task's *head*, its unpublished event with the
   lowest sequence, only ever moves forward.
3. ``published_at`` is committed only after the broker confirmed the message, so when a
   relay reads a head n, events 1..n-1 have reached the broker (or were skipped by hand).
   It publishes its run n, n+1, ... in order on one channel and cuts the run at the first
   failure. So whatever it gets to the broker comes after everything before it: first
   arrivals are in sequence order, whichever relay publishes.
4. A relay publishes a task's run only while it holds the row lock on the task's head
   (``pending_runs``: ``FOR UPDATE OF domain_events SKIP LOCKED``), inside the transaction
   that also marks the run published. A second relay either skips the locked head, or - if
   the first committed between its two reads - finds on re-check (PostgreSQL re-evaluates
   the WHERE clause on the newest row version) that the head is published and leaves it.
   So two relays never publish the same run at once: no duplicates in normal operation, and
   one event's failures are counted once per attempt. The run after the head is read
   without locks: only the head's holder may publish it.

A relay that dies after the broker's confirm but before its commit leaves the rows
unpublished; the next relay publishes them again (a duplicate, same ``message_id``) before
anything later of the task: at-least-once, in order. A relay whose transaction fails at the
marking (its connection terminated) lives on: it records the confirmed rows in a new
transaction before it selects anything else (``Relay._record_unrecorded``). The failed
transaction took the head's lock with it, though, so meanwhile another relay may publish
those rows again: the same kind of duplicate, at most that one batch, and in order by 3.

SQLite has no row locks: there ``duplex.events.relay_lock.RelayLock`` (an exclusive ``flock``
next to the database file) lets one relay at a time publish, and the others wait as standbys.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, or_, select, update

from duplex.messages import JSONDict
from duplex.storage.direct import DirectStatement
from duplex.storage.models import UTCDateTime, domain_events, tasks

de = domain_events
_TS = UTCDateTime()

# The relay's work list (neither published nor skipped); the same terms as the partial index
# ix_domain_events_unpublished, so both backends can use it.
PENDING = and_(de.c.published_at.is_(None), de.c.skipped_at.is_(None))


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A committed domain event as the relay and ``duplex events`` see it."""

    event_id: str
    name: str
    task_uuid: str
    step_uuid: str | None
    namespace: str
    sequence: int
    payload: JSONDict
    created_at: datetime
    publish_attempts: int = 0
    published_at: datetime | None = None
    dead_lettered_at: datetime | None = None
    skipped_at: datetime | None = None
    publish_error: str | None = None

    @property
    def state(self) -> str:
        """``published``, ``skipped``, ``dead_lettered`` or ``pending``."""
        if self.published_at is not None:
            return "published"
        if self.skipped_at is not None:
            return "skipped"
        if self.dead_lettered_at is not None:
            return "dead_lettered"
        return "pending"

    def as_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "name": self.name,
            "task_uuid": self.task_uuid,
            "step_uuid": self.step_uuid,
            "namespace": self.namespace,
            "sequence": self.sequence,
            "committed_at": self.created_at.isoformat(),
            "payload": self.payload,
            "state": self.state,
            "publish_attempts": self.publish_attempts,
            "publish_error": self.publish_error,
        }


# What ``OutboxEvent`` is read from (joined with ``tasks`` for the namespace).
EVENT_COLUMNS = (
    de.c.event_id,
    de.c.name,
    de.c.task_uuid,
    de.c.step_uuid,
    tasks.c.namespace,
    de.c.sequence,
    de.c.payload,
    de.c.created_at,
    de.c.publish_attempts,
    de.c.published_at,
    de.c.dead_lettered_at,
    de.c.skipped_at,
    de.c.publish_error,
)


def event_of_row(row: Any) -> OutboxEvent:
    """The ``OutboxEvent`` of a row selected with ``EVENT_COLUMNS``."""
    return OutboxEvent(
        row.event_id,
        row.name,
        row.task_uuid,
        row.step_uuid,
        row.namespace,
        row.sequence,
        row.payload,
        row.created_at,
        row.publish_attempts,
        row.published_at,
        row.dead_lettered_at,
        row.skipped_at,
        row.publish_error,
    )


# --- sequence numbers (the commit path) -------------------------------------------------


def next_sequences(conn: Connection, task_uuids: Iterable[str]) -> dict[str, int]:
    """Return each task's highest event sequence so far (0 for none).

    Call it only with the tasks locked (``lock_tasks``): that is what makes the numbers follow
    commit order (see the module docstring).
    """
    ids = sorted(set(task_uuids))
    if not ids:
        return {}
    found = {row.task_uuid: row.last or 0 for row in _LAST_SEQUENCES.rows(conn, {"ids": ids})}
    return {task_uuid: found.get(task_uuid, 0) for task_uuid in ids}


# One max() probe of (task_uuid, sequence) per task, whatever the task's size.
_LAST_SEQUENCES = DirectStatement(
    select(
        tasks.c.task_uuid,
        select(func.max(de.c.sequence))
        .where(de.c.task_uuid == tasks.c.task_uuid)
        .scalar_subquery()
        .label("last"),
    ).where(tasks.c.task_uuid.in_(bindparam("ids", expanding=True)))
)


# --- the relay's work list ----------------------------------------------------------------

# Materialised: computed once per statement. As a plain subquery PostgreSQL's planner, with
# the row estimates of a table that grows fast, re-ran the aggregate for every pending row.
_heads = (
    select(de.c.task_uuid, func.min(de.c.sequence).label("sequence"))
    .where(PENDING)
    .group_by(de.c.task_uuid)
    .cte("heads")
    .prefix_with("MATERIALIZED", dialect="postgresql")
)
# Each task's head, if it may be tried now: not dead-lettered (then the task waits behind
# it), not waiting for its retry time. Oldest first. The PENDING terms are repeated on the
# outer row so that PostgreSQL's re-check after a lock wait sees a head published meanwhile.
_HEADS = (
    select(de.c.event_id, de.c.task_uuid, de.c.sequence)
    .join_from(
        de,
        _heads,
        and_(de.c.task_uuid == _heads.c.task_uuid, de.c.sequence == _heads.c.sequence),
    )
    .where(
        PENDING,
        de.c.dead_lettered_at.is_(None),
        or_(de.c.retry_at.is_(None), de.c.retry_at <= bindparam("now", type_=_TS)),
    )
    .order_by(de.c.created_at, de.c.task_uuid)
    .limit(bindparam("limit"))
)
_HEADS_LOCKED = _HEADS.with_for_update(skip_locked=True, of=de)

_rank = func.row_number().over(partition_by=de.c.task_uuid, order_by=de.c.sequence).label("rank")
_run_rows = (
    select(*EVENT_COLUMNS, _rank)
    .join_from(de, tasks, tasks.c.task_uuid == de.c.task_uuid)
    .where(de.c.task_uuid.in_(bindparam("tasks", expanding=True)), PENDING)
    .subquery("runs")
)
_RUNS = (
    select(_run_rows)
    .where(_run_rows.c.rank <= bindparam("per_task"))
    .order_by(_run_rows.c.task_uuid, _run_rows.c.sequence)
)


def pending_runs(
    conn: Connection, *, limit: int, now: datetime, lock: bool
) -> list[list[OutboxEvent]]:
    """Return up to ``limit`` events to publish now, as one run per task in sequence order.

    Each run starts at its task's head and stops before a dead-lettered event. With ``lock``
    (PostgreSQL) the heads are locked ``FOR UPDATE SKIP LOCKED`` for the rest of the caller's
    transaction, which must also record the outcome (see the module docstring).
    """
    query = _HEADS_LOCKED if lock else _HEADS
    heads = {
        row.task_uuid: row.sequence for row in conn.execute(query, {"now": now, "limit": limit})
    }
    if not heads:
        return []
    per_task = max(1, limit // len(heads))
    runs: dict[str, list[OutboxEvent]] = {task_uuid: [] for task_uuid in heads}
    ended: set[str] = set()
    for row in conn.execute(_RUNS, {"tasks": sorted(heads), "per_task": per_task}):
        event = event_of_row(row)
        # A run ends before a dead-lettered event: the rest of the task waits behind it.
        if event.dead_lettered_at is not None:
            ended.add(event.task_uuid)
        if event.task_uuid not in ended:
            runs[event.task_uuid].append(event)
    # The head was locked and is the lowest unpublished sequence, so each run starts there;
    # one that does not (it cannot happen) is left for the next round rather than risked.
    return [run for task_uuid, run in runs.items() if run and run[0].sequence == heads[task_uuid]]


def mark_published(conn: Connection, event_ids: Sequence[str], *, now: datetime) -> int:
    """Set ``published_at`` on events the broker confirmed; return how many were marked."""
    if not event_ids:
        return 0
    result = conn.execute(_MARK_PUBLISHED, {"ids": list(event_ids), "now": now})
    return result.rowcount or 0


_MARK_PUBLISHED = (
    update(de)
    .where(de.c.event_id.in_(bindparam("ids", expanding=True)), de.c.published_at.is_(None))
    .values(published_at=bindparam("now", type_=_TS), retry_at=None)
)


@dataclass(frozen=True, slots=True)
class PublishFailure:
    """One failed publication of one event, and what follows from it."""

    event_id: str
    attempts: int
    error: str
    retry_at: datetime | None
    dead_lettered: bool


def record_failures(conn: Connection, failures: Sequence[PublishFailure], *, now: datetime) -> None:
    """Record failed publications: the count, the error, the retry time or the dead letter."""
    if not failures:
        return
    conn.execute(
        _RECORD_FAILURE,
        [
            {
                "b_event_id": f.event_id,
                "v_attempts": f.attempts,
                "v_error": f.error[:2000],
                "v_retry_at": f.retry_at,
                "v_dead": now if f.dead_lettered else None,
            }
            for f in failures
        ],
    )


_RECORD_FAILURE = (
    update(de)
    .where(de.c.event_id == bindparam("b_event_id"), de.c.published_at.is_(None))
    .values(
        publish_attempts=bindparam("v_attempts"),
        publish_error=bindparam("v_error"),
        retry_at=bindparam("v_retry_at", type_=_TS),
        dead_lettered_at=bindparam("v_dead", type_=_TS),
    )
)


# --- lag ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventLag:
    """How far the relay is behind."""

    unpublished: int
    dead_lettered: int
    oldest_unpublished_at: datetime | None
    published_last_minute: int

    def as_json(self, now: datetime) -> dict[str, Any]:
        oldest = self.oldest_unpublished_at
        return {
            "unpublished": self.unpublished,
            "dead_lettered": self.dead_lettered,
            "oldest_unpublished_age_s": (
                round((now - oldest).total_seconds(), 3) if oldest is not None else None
            ),
            "published_per_s": round(self.published_last_minute / 60, 2),
        }


def event_lag(conn: Connection, *, now: datetime) -> EventLag:
    """Count what waits to be published and what was published in the last minute."""
    row = conn.execute(
        select(
            func.count(),
            func.count(de.c.dead_lettered_at),
            func.min(de.c.created_at),
        ).where(PENDING)
    ).one()
    recent = conn.execute(
        select(func.count()).where(de.c.published_at >= bindparam("since", type_=_TS)),
        {"since": now - timedelta(minutes=1)},
    ).scalar_one()
    return EventLag(int(row[0]), int(row[1]), row[2], int(recent))
