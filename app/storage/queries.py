"""Reads of tasks: their execution status, their steps and transitions, the ready queue.

``duplex status`` and the dashboard list tasks from here; the worker reads its ready queue's
figures (``ready_queue``) and a task's trace context.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, column, func, or_, select, table

from duplex.attempts import attempts
from duplex.clock import utcnow
from duplex.errors import InputError
from duplex.states import ENQUEUED, IN_PROGRESS, SKIPPED, WAITING, WAITING_FOR_RETRY
from duplex.storage.batch_view import BatchGroup, skipped_by, step_note
from duplex.storage.claim_order import due_levels
from duplex.storage.models import (
    tasks,
    workflow_step_edges,
    workflow_step_transitions,
    workflow_steps,
)
from duplex.storage.pauses import NOT_PAUSED

execution_status = table(
    "task_execution_status",
    column("task_uuid"),
    column("total_steps"),
    column("pending_steps"),
    column("ready_steps"),
    column("in_progress_steps"),
    column("waiting_for_retry_steps"),
    column("complete_steps"),
    column("resolved_steps"),
    column("error_steps"),
    column("cancelled_steps"),
    column("skipped_steps"),
    column("waiting_steps"),
    column("execution_status"),
)


@dataclass(frozen=True)
class TaskSummary:
    """A task with its execution status."""

    task_uuid: str
    name: str
    namespace: str
    version: str
    state: str
    execution_status: str
    total_steps: int
    complete_steps: int
    error_steps: int
    created_at: datetime
    completed_at: datetime | None
    # Steps a decision skipped count as done; waiting steps wait for a signal or a time.
    skipped_steps: int = 0
    waiting_steps: int = 0
    # Execution status ``scheduled``: when its first steps may start (a delayed start).
    scheduled_for: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class StepSummary:
    """One step of a task."""

    step_uuid: str
    name: str
    handler: str
    state: str
    attempts: int
    max_attempts: int
    depends_on: tuple[str, ...]
    error_type: str | None
    error_message: str | None
    duration_ms: int | None
    next_attempt_at: datetime | None
    claimed_by: str | None
    results: dict[str, Any] | None
    priority: int = 0
    # An enqueued step whose start is delayed: not claimed before this time.
    scheduled_for: datetime | None = None
    kind: str = "handler"
    # Why a skipped step did not run, or what a waiting step waits for (``batch_view``).
    note: str | None = None
    # The decision that skipped this step (parsed from its transition's reason).
    skipped_by: str | None = None
    # A batch item's place in its batch; None for every other step.
    item_index: int | None = None

    def as_json(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def parse_uuid(text: str, what: str) -> str:
    """Return ``text`` as a canonical UUID, or raise ``InputError`` naming the unknown ``what``."""
    try:
        return str(uuid.UUID(text.strip()))
    except (ValueError, AttributeError):
        raise InputError(f"unknown {what}: {text} (not a UUID)") from None


# What every listing of tasks shows of a task's own row (``duplex status``, the dashboard).
TASK_COLUMNS = (
    tasks.c.task_uuid,
    tasks.c.name,
    tasks.c.namespace,
    tasks.c.version,
    tasks.c.state,
    tasks.c.created_at,
    tasks.c.completed_at,
)

_TASK_SUMMARY = select(
    *TASK_COLUMNS,
    execution_status.c.execution_status,
    execution_status.c.total_steps,
    execution_status.c.complete_steps,
    execution_status.c.error_steps,
    execution_status.c.skipped_steps,
    execution_status.c.waiting_steps,
).join(execution_status, execution_status.c.task_uuid == tasks.c.task_uuid)


def list_tasks(conn: Connection, *, limit: int = 50) -> list[TaskSummary]:
    """Return the newest tasks first, with their execution status."""
    rows = conn.execute(
        _TASK_SUMMARY.order_by(tasks.c.created_at.desc(), tasks.c.task_uuid).limit(limit)
    )
    return with_start_times(conn, [TaskSummary(**row._asdict()) for row in rows])


def with_start_times(conn: Connection, summaries: list[TaskSummary]) -> list[TaskSummary]:
    """Fill ``scheduled_for`` of the tasks whose execution status is ``scheduled``: the
    earliest start of their enqueued steps (index (task_uuid, state))."""
    starts = start_times(
        conn, [t.task_uuid for t in summaries if t.execution_status == "scheduled"]
    )
    return [replace(t, scheduled_for=starts.get(t.task_uuid)) for t in summaries]


def start_times(conn: Connection, task_uuids: Sequence[str]) -> dict[str, datetime]:
    """The earliest start of each task's enqueued steps (for tasks waiting for their time)."""
    if not task_uuids:
        return {}
    ws = workflow_steps
    rows = conn.execute(
        select(ws.c.task_uuid, func.min(ws.c.next_attempt_at))
        .where(ws.c.task_uuid.in_(list(task_uuids)), ws.c.state == ENQUEUED)
        .group_by(ws.c.task_uuid)
    )
    return {task: _as_utc(start) for task, start in rows if start is not None}


def count_tasks(conn: Connection) -> int:
    """Return how many tasks there are."""
    return int(conn.execute(select(func.count()).select_from(tasks)).scalar_one())


def get_task(conn: Connection, task_uuid: str) -> TaskSummary:
    """Return one task, or raise ``InputError`` naming the unknown uuid."""
    task_id = parse_uuid(task_uuid, "task")
    row = conn.execute(_TASK_SUMMARY.where(tasks.c.task_uuid == task_id)).first()
    if row is None:
        raise InputError(f"unknown task: {task_uuid}")
    return with_start_times(conn, [TaskSummary(**row._asdict())])[0]


def task_steps(
    conn: Connection,
    task_uuid: str,
    *,
    now: datetime | None = None,
    group: BatchGroup | None = None,
) -> list[StepSummary]:
    """Return a task's steps in dependency order (parents before children), batch items left
    out (``batch_view.batch_groups`` counts them); with ``group``, that batch's items instead.

    ``duration_ms`` is the last attempt's, from the transition rows as the dashboard reads them
    (``duplex.attempts``): from its claim to its outcome's commit, or until ``now`` while it runs.
    A step never attempted has none.
    """
    task_uuid = parse_uuid(task_uuid, "task")
    now = now or utcnow()
    ws = workflow_steps
    parent = ws.alias("parent")
    child = ws.alias("child")
    items = group is not None
    parents: dict[str, list[str]] = {}
    # Only the edges between the steps listed: a convergence's 100k item parents are one
    # group, not 100k names.
    for child_uuid, name in conn.execute(
        select(workflow_step_edges.c.to_step_uuid, parent.c.name)
        .join(parent, parent.c.step_uuid == workflow_step_edges.c.from_step_uuid)
        .join(child, child.c.step_uuid == workflow_step_edges.c.to_step_uuid)
        .where(
            parent.c.task_uuid == task_uuid,
            parent.c.item_index.is_(None),
            child.c.item_index.is_not(None) if items else child.c.item_index.is_(None),
        )
        .order_by(parent.c.position)
    ):
        parents.setdefault(child_uuid, []).append(name)
    transitions = transitions_of_task(conn, task_uuid, group=group)
    tried = attempts(transitions)
    last_reason = {t.step_uuid: t.reason for t in transitions}
    query = select(ws).where(ws.c.task_uuid == task_uuid)
    if group is None:
        query = query.where(ws.c.item_index.is_(None)).order_by(ws.c.position)
    else:
        query = query.where(ws.c.item_index.is_not(None), ws.c.position == group.position).order_by(
            ws.c.item_index
        )
    steps = []
    for row in conn.execute(query):
        error = row.error or {}
        last = tried.get(row.step_uuid)
        reason = last_reason.get(row.step_uuid)
        steps.append(
            StepSummary(
                step_uuid=row.step_uuid,
                name=row.name,
                handler=row.handler,
                state=row.state,
                attempts=row.attempts,
                max_attempts=row.max_attempts,
                depends_on=tuple(parents.get(row.step_uuid, ())),
                error_type=error.get("error_type"),
                error_message=error.get("message"),
                duration_ms=last[-1].duration_ms(now) if last else None,
                next_attempt_at=row.next_attempt_at
                if row.state in (WAITING_FOR_RETRY, WAITING)
                else None,
                claimed_by=row.claimed_by,
                results=row.results,
                priority=row.priority,
                scheduled_for=row.next_attempt_at
                if row.state == ENQUEUED and row.next_attempt_at and row.next_attempt_at > now
                else None,
                kind=row.kind,
                note=step_note(row.state, row.kind, row.spec, row.next_attempt_at, reason),
                skipped_by=skipped_by(reason) if row.state == SKIPPED else None,
                item_index=row.item_index,
            )
        )
    return steps


@dataclass(frozen=True)
class TransitionRow:
    step_uuid: str
    from_state: str | None
    to_state: str
    attempt: int
    worker_id: str | None
    reason: str | None
    created_at: datetime


TRANSITIONS = select(
    workflow_step_transitions.c.step_uuid,
    workflow_step_transitions.c.from_state,
    workflow_step_transitions.c.to_state,
    workflow_step_transitions.c.attempt,
    workflow_step_transitions.c.worker_id,
    workflow_step_transitions.c.reason,
    workflow_step_transitions.c.created_at,
).order_by(workflow_step_transitions.c.id)


def transitions_of_task(
    conn: Connection, task_uuid: str, *, group: BatchGroup | None = None
) -> list[TransitionRow]:
    """The transition rows of a task's steps, batch items left out (or, with ``group``, of
    that batch's items only), in the order they were written."""
    ws = workflow_steps
    query = TRANSITIONS.join(ws, ws.c.step_uuid == workflow_step_transitions.c.step_uuid).where(
        ws.c.task_uuid == task_uuid
    )
    if group is None:
        query = query.where(ws.c.item_index.is_(None))
    else:
        query = query.where(ws.c.item_index.is_not(None), ws.c.position == group.position)
    return [TransitionRow(*row) for row in conn.execute(query)]


def task_trace_context(conn: Connection, task_uuid: str) -> dict[str, str] | None:
    """Return the trace context stored with a task at submit, if any."""
    value = conn.execute(
        select(tasks.c.trace_context).where(tasks.c.task_uuid == task_uuid)
    ).scalar_one_or_none()
    return value if isinstance(value, dict) else None


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, datetime):
            out[key] = value.isoformat()
        elif isinstance(value, tuple):
            out[key] = list(value)
        else:
            out[key] = value
    return out


def ready_queue(
    conn: Connection, namespaces: Sequence[str], *, now: datetime
) -> tuple[dict[str, int], dict[str, float]]:
    """Return, per namespace, the steps ready to run and the age of the oldest (seconds).

    Ready: enqueued or waiting for a retry, and due (``next_attempt_at``: ready since, due
    at, scheduled for). Counted per priority level with due steps, each one range of the
    claim index, so steps waiting for a later start are not read.
    """
    ws = workflow_steps
    ready = {namespace: 0 for namespace in namespaces}
    oldest: dict[str, float] = {namespace: 0.0 for namespace in namespaces}
    for level in due_levels(conn, namespaces, now=now):
        count, since = conn.execute(
            select(func.count(), func.min(ws.c.next_attempt_at)).where(
                ws.c.state == level.state,
                ws.c.namespace == level.namespace,
                ws.c.priority == level.priority,
                ws.c.next_attempt_at <= now,
            )
        ).one()
        ready[level.namespace] += int(count)
        if since is not None:
            since = _as_utc(since)
            oldest[level.namespace] = max(oldest[level.namespace], (now - since).total_seconds())
    return ready, oldest


def _as_utc(value: datetime | str) -> datetime:
    # An aggregate loses the column type on SQLite: the text comes back as stored (UTC).
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


ws = workflow_steps


def count_open_work(conn: Connection, namespaces: Sequence[str]) -> int:
    """Count steps that could still run without an operator: in progress, and enqueued or
    retrying unless paused (resuming is an operator's move; ``duplex run --until-idle`` would
    otherwise wait for it forever), and sleeps and waits that end by themselves (a wait with
    no timeout needs a signal: waiting for it could be forever too)."""
    query = select(func.count()).where(
        and_(
            ws.c.namespace.in_(list(namespaces)),
            or_(
                ws.c.state == IN_PROGRESS,
                and_(ws.c.state.in_((ENQUEUED, WAITING_FOR_RETRY)), NOT_PAUSED),
                # A step held by its concurrency key goes once its key has room.
                and_(
                    ws.c.state == WAITING,
                    or_(
                        ws.c.next_attempt_at.is_not(None),
                        ws.c.concurrency_key.is_not(None),
                    ),
                ),
            ),
        )
    )
    return int(conn.execute(query).scalar_one())
