"""The dashboard's page of one task or step: the task, its steps, transitions and events.

Every query is bounded by the task: steps, transitions and events are read through the
per-task indexes, a task's events at most ``limit`` at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, func, null, select

from duplex.errors import InputError
from duplex.storage.dashboard_list import step_summaries
from duplex.storage.models import (
    domain_events,
    tasks,
    workflow_step_edges,
    workflow_step_transitions,
)
from duplex.storage.models import workflow_steps as ws
from duplex.storage.queries import TASK_COLUMNS, TRANSITIONS, TransitionRow, parse_uuid


@dataclass(frozen=True)
class TaskDetail:
    task_uuid: str
    name: str
    namespace: str
    version: str
    state: str
    context: Any
    created_at: datetime
    completed_at: datetime | None
    idempotency_key: str | None
    execution_status: str
    scheduled_for: datetime | None = None
    # When the task must be finished (``max_duration``), if it has a deadline.
    deadline_at: datetime | None = None


@dataclass(frozen=True)
class StepRow:
    step_uuid: str
    task_uuid: str
    name: str
    handler: str
    position: int
    state: str
    attempts: int
    max_attempts: int
    retryable: bool
    timeout_ms: int | None
    inputs: Any
    results: Any
    error: Any
    next_attempt_at: datetime | None
    claimed_by: str | None
    created_at: datetime
    completed_at: datetime | None
    priority: int  # docs/time.md, Priority
    kind: str = "handler"  # docs/workflows.md: decision, batch, wait, sleep
    spec: Any = None
    item_index: int | None = None  # a batch item's place in its batch
    parents: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EventRow:
    event_id: str
    name: str
    step_uuid: str | None
    sequence: int
    payload: Any
    created_at: datetime
    published_at: datetime | None
    dead_lettered_at: datetime | None
    skipped_at: datetime | None


def task_detail(conn: Connection, task_uuid: str) -> TaskDetail:
    """Return one task, or raise ``InputError`` naming the unknown uuid."""
    task_id = parse_uuid(task_uuid, "task")
    t = tasks.c
    row = conn.execute(
        select(*TASK_COLUMNS, t.context, t.idempotency_key, t.deadline_at).where(
            t.task_uuid == task_id
        )
    ).first()
    if row is None:
        raise InputError(f"unknown task: {task_id}")
    summary = step_summaries(conn, [task_id])[task_id]
    return TaskDetail(
        **row._asdict(),
        execution_status=summary["execution_status"],
        scheduled_for=summary["scheduled_for"],
    )


_STEP_COLUMNS = (
    ws.c.step_uuid,
    ws.c.task_uuid,
    ws.c.name,
    ws.c.handler,
    ws.c.position,
    ws.c.state,
    ws.c.attempts,
    ws.c.max_attempts,
    ws.c.retryable,
    ws.c.timeout_ms,
    ws.c.inputs,
    ws.c.results,
    ws.c.error,
    ws.c.next_attempt_at,
    ws.c.claimed_by,
    ws.c.created_at,
    ws.c.completed_at,
    ws.c.priority,
    ws.c.kind,
    ws.c.spec,
    ws.c.item_index,
)


_WITHOUT_DATA = tuple(
    null().label(column.name) if column.name in ("inputs", "results") else column
    for column in _STEP_COLUMNS
)


def steps_of_task(conn: Connection, task_uuid: str, *, data: bool = True) -> list[StepRow]:
    """A task's steps in template order, each with its parents' step uuids; batch items are
    left out (``batch_view`` counts them and pages them), and so are the edges from and to
    them: a convergence's 100k item parents are drawn as one group.

    ``data=False`` leaves out inputs and results (``None``): a page of a 1000-step task shows
    neither, and they are the bulk of the rows.
    """
    parents: dict[str, list[str]] = {}
    for parent, child in conn.execute(_EDGES_BETWEEN_STEPS, {"task_uuid": task_uuid}):
        parents.setdefault(child, []).append(parent)
    columns = _STEP_COLUMNS if data else _WITHOUT_DATA
    rows = conn.execute(
        select(*columns)
        .where(ws.c.task_uuid == task_uuid, ws.c.item_index.is_(None))
        .order_by(ws.c.position)
    )
    # Positional: the columns are in the dataclass's field order (``_asdict`` costs a dict).
    return [StepRow(*[*row, parents.get(row[0], [])]) for row in rows]


_parent = ws.alias("parent")
_child = ws.alias("child")
_edges = workflow_step_edges.c
# The edges between a task's steps that are not batch items.
_EDGES_BETWEEN_STEPS = (
    select(_edges.from_step_uuid, _edges.to_step_uuid)
    .join(_child, _child.c.step_uuid == _edges.to_step_uuid)
    .join(_parent, _parent.c.step_uuid == _edges.from_step_uuid)
    .where(
        _child.c.task_uuid == bindparam("task_uuid"),
        _child.c.item_index.is_(None),
        _parent.c.item_index.is_(None),
    )
)


def step_detail(conn: Connection, step_uuid: str) -> StepRow:
    """Return one step, or raise ``InputError`` naming the unknown uuid."""
    step_id = parse_uuid(step_uuid, "step")
    row = conn.execute(select(*_STEP_COLUMNS).where(ws.c.step_uuid == step_id)).first()
    if row is None:
        raise InputError(f"unknown step: {step_id}")
    # A convergence's items are not listed one by one (its page links to their batch).
    parents = conn.execute(
        select(_edges.from_step_uuid)
        .join(_parent, _parent.c.step_uuid == _edges.from_step_uuid)
        .where(_edges.to_step_uuid == step_id, _parent.c.item_index.is_(None))
    )
    return StepRow(**row._asdict(), parents=[p for (p,) in parents])


def transitions_of_step(conn: Connection, step_uuid: str) -> list[TransitionRow]:
    """One step's transition rows, in the order they were written."""
    query = TRANSITIONS.where(workflow_step_transitions.c.step_uuid == step_uuid)
    return [TransitionRow(*row) for row in conn.execute(query)]


def events_of_task(
    conn: Connection, task_uuid: str, *, step_uuid: str | None = None, limit: int = 500
) -> tuple[list[EventRow], int]:
    """A task's (or one of its steps') domain events in sequence order, and how many exist."""
    e = domain_events.c
    where = [e.task_uuid == task_uuid]
    if step_uuid is not None:
        where.append(e.step_uuid == step_uuid)
    rows = conn.execute(
        select(
            e.event_id,
            e.name,
            e.step_uuid,
            e.sequence,
            e.payload,
            e.created_at,
            e.published_at,
            e.dead_lettered_at,
            e.skipped_at,
        )
        .where(*where)
        .order_by(e.sequence)
        .limit(limit)
    )
    events = [EventRow(*row) for row in rows]
    total = len(events)
    if total == limit:
        total = int(
            conn.execute(select(func.count()).select_from(domain_events).where(*where)).scalar_one()
        )
    return events, total
