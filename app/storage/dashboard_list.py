"""The dashboard's task list: filtered, keyset-paginated task pages and the status counts.

Every query is bounded: task lists are keyset-paginated on ``(created_at, task_uuid)`` (the
``tasks.created_at`` index), and the execution status is computed only for the tasks on the
page. One task's page reads from ``duplex.storage.dashboard_detail``.
The status counts and the status filter derive the status only for tasks neither complete
nor cancelled: a complete task is ``all_complete`` and a cancelled one ``cancelled`` by
definition, so a long history of such work costs one count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Select, and_, case, func, or_, select

from duplex.clock import utcnow
from duplex.states import (
    DONE,
    ENQUEUED,
    ERROR,
    IN_PROGRESS,
    TASK_CANCELLED,
    TASK_COMPLETE,
    TASK_STATES,
    WAITING_FOR_RETRY,
)
from duplex.storage.models import tasks
from duplex.storage.models import workflow_steps as ws
from duplex.storage.queries import TASK_COLUMNS, execution_status, start_times

EXECUTION_STATUSES = (
    "blocked_by_failures",
    "has_ready_steps",
    "processing",
    "scheduled",
    "all_complete",
    "waiting_for_dependencies",
    "cancelled",
)
ALL_COMPLETE = "all_complete"
CANCELLED = "cancelled"
# The task states whose execution status needs their steps: a complete task is all_complete
# and a cancelled one cancelled by definition. An IN list rather than ``NOT IN``, so that the
# (state, created_at) index serves it.
_STATUS_FROM_STEPS = tuple(s for s in TASK_STATES if s not in (TASK_COMPLETE, TASK_CANCELLED))


@dataclass(frozen=True)
class TaskFilter:
    """What the task list is narrowed to; ``None`` means any."""

    state: str | None = None
    execution_status: str | None = None
    name: str | None = None
    namespace: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class Cursor:
    """A position in the newest-first task order: the row ``(created_at, task_uuid)``."""

    created_at: datetime
    task_uuid: str


@dataclass(frozen=True)
class TaskRow:
    task_uuid: str
    name: str
    namespace: str
    version: str
    state: str
    created_at: datetime
    completed_at: datetime | None
    execution_status: str
    total_steps: int
    complete_steps: int
    error_steps: int
    in_progress_steps: int
    # Complete, resolved or skipped: the task list's progress (a skipped step is done).
    done_steps: int = 0
    # Execution status ``scheduled``: when its first steps may start (docs/time.md).
    scheduled_for: datetime | None = None


@dataclass(frozen=True)
class TaskPage:
    """One page of the task list, with cursors to the pages beside it."""

    rows: list[TaskRow]
    older: Cursor | None
    newer: Cursor | None


def _filtered(query: Select[Any], flt: TaskFilter, *, with_status: bool = True) -> Select[Any]:
    t = tasks.c
    if flt.state is not None:
        query = query.where(t.state == flt.state)
    if flt.name is not None:
        query = query.where(t.name == flt.name)
    if flt.namespace is not None:
        query = query.where(t.namespace == flt.namespace)
    if flt.since is not None:
        query = query.where(t.created_at >= flt.since)
    if flt.until is not None:
        query = query.where(t.created_at < flt.until)
    if with_status and flt.execution_status is not None:
        query = query.where(_has_status(flt.execution_status, flt))
    return query


def _has_status(status: str, flt: TaskFilter) -> Any:
    if status == CANCELLED:
        return tasks.c.state == TASK_CANCELLED
    statuses = _open_task_statuses(flt).subquery()
    in_status = tasks.c.task_uuid.in_(
        select(statuses.c.task_uuid).where(statuses.c.execution_status == status)
    )
    if status == ALL_COMPLETE:
        return or_(tasks.c.state == TASK_COMPLETE, in_status)
    return in_status


def _open_task_statuses(flt: TaskFilter) -> Select[Any]:
    """``(task_uuid, execution_status)`` of the filtered tasks neither complete nor cancelled.

    The same rule as the ``task_execution_status`` view (which ``test_dashboard_storage``
    checks), with the filter applied before the grouping: the view itself is grouped over
    every task before any join or WHERE can narrow it, so on 100k tasks it reads them all.
    """
    s = ws.c
    now = utcnow()

    def some(condition: Any) -> Any:
        return func.sum(case((condition, 1), else_=0)) > 0

    ready = or_(
        and_(s.state == ENQUEUED, or_(s.next_attempt_at.is_(None), s.next_attempt_at <= now)),
        and_(s.state == WAITING_FOR_RETRY, s.next_attempt_at <= now),
    )
    done = func.sum(case((s.state.in_(DONE), 1), else_=0))
    status = case(
        (some(s.state == ERROR), "blocked_by_failures"),
        (some(ready), "has_ready_steps"),
        (some(s.state == IN_PROGRESS), "processing"),
        (some(and_(s.state == ENQUEUED, s.next_attempt_at > now)), "scheduled"),
        (and_(func.count(s.step_uuid) > 0, done == func.count(s.step_uuid)), ALL_COMPLETE),
        else_="waiting_for_dependencies",
    )
    query = (
        select(tasks.c.task_uuid, status.label("execution_status"))
        .select_from(tasks.outerjoin(ws, s.task_uuid == tasks.c.task_uuid))
        .where(tasks.c.state.in_(_STATUS_FROM_STEPS))
        .group_by(tasks.c.task_uuid)
    )
    return _filtered(query, flt, with_status=False)


def task_page(
    conn: Connection,
    flt: TaskFilter,
    *,
    limit: int,
    before: Cursor | None = None,
    after: Cursor | None = None,
) -> TaskPage:
    """Return up to ``limit`` tasks, newest first: the first page, or the page older than
    ``before``, or the page newer than ``after``."""
    t = tasks.c
    query = _filtered(select(*TASK_COLUMNS), flt)
    if after is not None:
        query = query.where(_newer_than(after))
        query = query.order_by(t.created_at.asc(), t.task_uuid.asc())
    else:
        if before is not None:
            query = query.where(_older_than(before))
        query = query.order_by(t.created_at.desc(), t.task_uuid.desc())
    found = list(conn.execute(query.limit(limit + 1)))
    more = len(found) > limit
    found = found[:limit]
    if after is not None:
        found.reverse()
    statuses = step_summaries(conn, [row.task_uuid for row in found])
    rows = [TaskRow(**row._asdict(), **statuses[row.task_uuid]) for row in found]
    if not rows:
        return TaskPage(rows, None, None)
    newest = Cursor(rows[0].created_at, rows[0].task_uuid)
    oldest = Cursor(rows[-1].created_at, rows[-1].task_uuid)
    if after is None:
        has_older = more
        has_newer = before is not None and _exists(conn, flt, _newer_than(newest))
    else:
        has_older = _exists(conn, flt, _older_than(oldest))
        has_newer = more
    return TaskPage(rows, older=oldest if has_older else None, newer=newest if has_newer else None)


def _older_than(cursor: Cursor) -> Any:
    t = tasks.c
    return or_(
        t.created_at < cursor.created_at,
        and_(t.created_at == cursor.created_at, t.task_uuid < cursor.task_uuid),
    )


def _newer_than(cursor: Cursor) -> Any:
    t = tasks.c
    return or_(
        t.created_at > cursor.created_at,
        and_(t.created_at == cursor.created_at, t.task_uuid > cursor.task_uuid),
    )


def _exists(conn: Connection, flt: TaskFilter, condition: Any) -> bool:
    query = _filtered(select(tasks.c.task_uuid), flt).where(condition).limit(1)
    return conn.execute(query).first() is not None


def step_summaries(conn: Connection, task_uuids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The execution status and step counts of these tasks, from one grouped query.

    Keyed by task uuid; each value has ``execution_status``, ``total_steps``,
    ``complete_steps``, ``error_steps``, ``in_progress_steps``, ``done_steps`` (complete,
    resolved or skipped) and ``scheduled_for``.
    """
    if not task_uuids:
        return {}
    v = execution_status.c
    query = select(
        v.task_uuid,
        v.execution_status,
        v.total_steps,
        v.complete_steps,
        v.error_steps,
        v.in_progress_steps,
        v.resolved_steps,
        v.skipped_steps,
    ).where(v.task_uuid.in_(list(task_uuids)))
    summaries = {
        row.task_uuid: {
            "execution_status": row.execution_status,
            "total_steps": int(row.total_steps),
            "complete_steps": int(row.complete_steps),
            "error_steps": int(row.error_steps),
            "in_progress_steps": int(row.in_progress_steps),
            "done_steps": int(row.complete_steps + row.resolved_steps + row.skipped_steps),
            "scheduled_for": None,
        }
        for row in conn.execute(query)
    }
    waiting = [task for task, s in summaries.items() if s["execution_status"] == "scheduled"]
    for task, start in start_times(conn, waiting).items():
        summaries[task]["scheduled_for"] = start
    return summaries


def status_counts(conn: Connection, flt: TaskFilter) -> dict[str, int]:
    """How many tasks of the filter (its status aside) have each execution status."""
    counts = dict.fromkeys(EXECUTION_STATUSES, 0)
    by_state = conn.execute(
        _filtered(select(tasks.c.state, func.count()).select_from(tasks), flt, with_status=False)
        .where(tasks.c.state.in_([TASK_COMPLETE, TASK_CANCELLED]))
        .group_by(tasks.c.state)
    )
    for state, count in by_state:
        counts[ALL_COMPLETE if state == TASK_COMPLETE else CANCELLED] += int(count)
    statuses = _open_task_statuses(flt).subquery()
    grouped = select(statuses.c.execution_status, func.count()).group_by(
        statuses.c.execution_status
    )
    for status, count in conn.execute(grouped):
        counts[str(status)] = counts.get(str(status), 0) + int(count)
    return counts


def filter_choices(conn: Connection) -> tuple[list[str], list[str]]:
    """The template names and namespaces that tasks have, for the filter menus."""
    names = conn.execute(select(tasks.c.name).distinct().order_by(tasks.c.name).limit(500))
    spaces = conn.execute(
        select(tasks.c.namespace).distinct().order_by(tasks.c.namespace).limit(500)
    )
    return [str(n) for (n,) in names], [str(n) for (n,) in spaces]
