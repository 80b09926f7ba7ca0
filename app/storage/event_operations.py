"""What operators read and do with outbox events: ``duplex events`` lists, retry and skip.

A dead-lettered event holds up its task's later events until an operator retries it (a fresh
set of attempts) or skips it (settled without publishing); each such action is recorded in
``domain_event_actions``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from duplex.errors import InputError, TransitionError
from duplex.storage.models import UTCDateTime, domain_event_actions, domain_events, tasks
from duplex.storage.outbox import EVENT_COLUMNS, OutboxEvent, event_of_row

de = domain_events
_TS = UTCDateTime()


# --- retry and skip ----------------------------------------------------------------------


def get_event(conn: Connection, event_id: str) -> OutboxEvent:
    """Return one event; ``InputError`` naming it when there is none."""
    row = conn.execute(
        select(*EVENT_COLUMNS)
        .join_from(de, tasks, tasks.c.task_uuid == de.c.task_uuid)
        .where(de.c.event_id == event_id)
    ).first()
    if row is None:
        raise InputError(f"no domain event with id {event_id}")
    return event_of_row(row)


def retry_event(
    conn: Connection, event_id: str, *, operator: str, now: datetime, reason: str | None
) -> OutboxEvent:
    """Give a dead-lettered event a fresh set of attempts; it is the task's head again."""
    event = _dead_lettered(conn, event_id, "retry")
    conn.execute(
        update(de)
        .where(de.c.event_id == event_id)
        .values(dead_lettered_at=None, publish_attempts=0, retry_at=None)
    )
    _record_action(conn, event_id, "retry", operator=operator, now=now, reason=reason)
    return event


def skip_event(
    conn: Connection, event_id: str, *, operator: str, now: datetime, reason: str | None
) -> OutboxEvent:
    """Settle a dead-lettered event without publishing it; the task's later events go on."""
    event = _dead_lettered(conn, event_id, "skip")
    conn.execute(
        update(de).where(de.c.event_id == event_id).values(skipped_at=bindparam("now", type_=_TS)),
        {"now": now},
    )
    _record_action(conn, event_id, "skip", operator=operator, now=now, reason=reason)
    return event


def _dead_lettered(conn: Connection, event_id: str, action: str) -> OutboxEvent:
    # Row-locked on PostgreSQL, so the check and the change see the same row.
    query = select(de.c.event_id).where(de.c.event_id == event_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    conn.execute(query)
    event = get_event(conn, event_id)
    if event.state != "dead_lettered":
        raise TransitionError(
            f"cannot {action} event {event_id}: it is {event.state}, not dead_lettered"
        )
    return event


def _record_action(
    conn: Connection,
    event_id: str,
    action: str,
    *,
    operator: str,
    now: datetime,
    reason: str | None,
) -> None:
    conn.execute(
        insert(domain_event_actions).values(
            event_id=event_id, action=action, operator=operator, reason=reason, created_at=now
        )
    )


def event_actions(conn: Connection, event_id: str) -> list[dict[str, Any]]:
    """What operators did to an event, oldest first."""
    rows = conn.execute(
        select(domain_event_actions)
        .where(domain_event_actions.c.event_id == event_id)
        .order_by(domain_event_actions.c.id)
    )
    return [dict(row._mapping) for row in rows]


# --- readers (duplex events) ---------------------------------------------------------------


def task_events(
    conn: Connection, task_uuid: str, *, after_sequence: int = 0, limit: int = 1000
) -> list[OutboxEvent]:
    """A task's events after ``after_sequence``, in sequence (commit) order."""
    rows = conn.execute(
        select(*EVENT_COLUMNS)
        .join_from(de, tasks, tasks.c.task_uuid == de.c.task_uuid)
        .where(de.c.task_uuid == task_uuid, de.c.sequence > after_sequence)
        .order_by(de.c.sequence)
        .limit(limit)
    )
    return [event_of_row(row) for row in rows]


def recent_events(conn: Connection, *, since: datetime | None, limit: int) -> list[OutboxEvent]:
    """Events committed at or after ``since`` (all when None): the newest ``limit``, in order.

    Across tasks the order is ``created_at`` (the commit batch's time), then task, then
    sequence: within a task that is commit order; across tasks no order is promised.
    """
    query = select(*EVENT_COLUMNS).join_from(de, tasks, tasks.c.task_uuid == de.c.task_uuid)
    if since is not None:
        query = query.where(de.c.created_at >= bindparam("since", type_=_TS))
    newest = query.order_by(
        de.c.created_at.desc(), de.c.task_uuid.desc(), de.c.sequence.desc()
    ).limit(limit)
    rows = list(conn.execute(newest, {"since": since}))
    rows.reverse()
    return [event_of_row(row) for row in rows]


def task_exists(conn: Connection, task_uuid: str) -> bool:
    return (
        conn.execute(select(tasks.c.task_uuid).where(tasks.c.task_uuid == task_uuid)).first()
        is not None
    )
