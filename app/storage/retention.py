"""Retention (``duplex prune``): delete finished tasks and old published events, in batches.

A task goes only once it can never change again and no one waits for its events: finished
before the cutoff, every event published or skipped. Of the tasks that stay, published events
older than the cutoff go, except each task's newest, which numbers its next event.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, delete, func, or_, select

from duplex.states import TASK_FINISHED
from duplex.storage.models import (
    UTCDateTime,
    domain_event_actions,
    domain_events,
    step_signals,
    tasks,
    workflow_step_edges,
    workflow_step_transitions,
    workflow_steps,
)
from duplex.storage.outbox import PENDING

de = domain_events
_TS = UTCDateTime()


@dataclass
class PruneCounts:
    """What a prune deleted (or, dry, would delete)."""

    tasks: int = 0
    steps: int = 0
    events: int = 0

    def add(self, other: PruneCounts) -> None:
        self.tasks += other.tasks
        self.steps += other.steps
        self.events += other.events

    @property
    def empty(self) -> bool:
        return not (self.tasks or self.steps or self.events)


ws = workflow_steps
_unsettled = select(de.c.event_id).where(de.c.task_uuid == tasks.c.task_uuid, PENDING).exists()
# Finished before the cutoff, and every event published or skipped (a dead-lettered event is
# unpublished): such a task can never change again, and no one still waits for its events.
_PRUNABLE_TASKS = (
    select(tasks.c.task_uuid)
    .where(
        tasks.c.state.in_(TASK_FINISHED),
        tasks.c.completed_at < bindparam("cutoff", type_=_TS),
        ~_unsettled,
    )
    .order_by(tasks.c.completed_at)
    .limit(bindparam("limit"))
)
_later = de.alias("later")
# Published (or skipped) events older than the cutoff, of tasks that stay. Each task keeps
# its newest event, so that its next event is numbered after it (next_sequences reads max).
_PRUNABLE_EVENTS = (
    select(de.c.event_id)
    .where(
        or_(de.c.published_at.is_not(None), de.c.skipped_at.is_not(None)),
        de.c.created_at < bindparam("cutoff", type_=_TS),
        select(_later.c.event_id)
        .where(_later.c.task_uuid == de.c.task_uuid, _later.c.sequence > de.c.sequence)
        .exists(),
    )
    .limit(bindparam("limit"))
)


def prune_batch(conn: Connection, *, cutoff: datetime, limit: int) -> PruneCounts:
    """Delete one batch: up to ``limit`` finished tasks, or else old published events.

    Meant for a short write transaction of its own, so SQLite's writer lock is never held
    for long; call it again until it deletes nothing.
    """
    params = {"cutoff": cutoff, "limit": limit}
    task_ids = [row.task_uuid for row in conn.execute(_PRUNABLE_TASKS, params)]
    counts = PruneCounts()
    if task_ids:
        step_ids = select(ws.c.step_uuid).where(ws.c.task_uuid.in_(task_ids))
        event_ids = select(de.c.event_id).where(de.c.task_uuid.in_(task_ids))
        edges = workflow_step_edges
        conn.execute(
            delete(domain_event_actions).where(domain_event_actions.c.event_id.in_(event_ids))
        )
        counts.events = conn.execute(delete(de).where(de.c.task_uuid.in_(task_ids))).rowcount
        conn.execute(
            delete(workflow_step_transitions).where(
                workflow_step_transitions.c.step_uuid.in_(step_ids)
            )
        )
        conn.execute(
            delete(edges).where(
                or_(edges.c.from_step_uuid.in_(step_ids), edges.c.to_step_uuid.in_(step_ids))
            )
        )
        # A finished task's signals (``duplex signal``) go with it.
        conn.execute(delete(step_signals).where(step_signals.c.task_uuid.in_(task_ids)))
        counts.steps = conn.execute(delete(ws).where(ws.c.task_uuid.in_(task_ids))).rowcount
        counts.tasks = conn.execute(delete(tasks).where(tasks.c.task_uuid.in_(task_ids))).rowcount
        return counts
    # Event rows are small: ten times as many per batch as tasks.
    loose = [
        row.event_id
        for row in conn.execute(_PRUNABLE_EVENTS, {"cutoff": cutoff, "limit": limit * 10})
    ]
    if loose:
        conn.execute(delete(domain_event_actions).where(domain_event_actions.c.event_id.in_(loose)))
        counts.events = conn.execute(delete(de).where(de.c.event_id.in_(loose))).rowcount
    return counts


def count_prunable(conn: Connection, *, cutoff: datetime) -> PruneCounts:
    """Count everything a prune with ``cutoff`` would delete (for ``--dry-run``)."""
    prunable = _PRUNABLE_TASKS.limit(None).subquery()
    ids = select(prunable.c.task_uuid)
    params = {"cutoff": cutoff}
    counts = PruneCounts()
    counts.tasks = conn.execute(select(func.count()).select_from(prunable), params).scalar_one()
    counts.steps = conn.execute(
        select(func.count()).where(ws.c.task_uuid.in_(ids)), params
    ).scalar_one()
    counts.events = conn.execute(
        select(func.count()).where(de.c.task_uuid.in_(ids)), params
    ).scalar_one()
    # Published events of the tasks that stay (the tasks above take theirs with them).
    loose = _PRUNABLE_EVENTS.where(de.c.task_uuid.not_in(ids)).limit(None).subquery()
    counts.events += conn.execute(select(func.count()).select_from(loose), params).scalar_one()
    return counts
