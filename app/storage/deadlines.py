"""Task deadlines (``max_duration``): cancelling what is left of a task once its time is up.

A task submitted with a ``max_duration`` carries ``tasks.deadline_at``. Once it passes, the task
is *expired*, in one transaction (``expire_tasks``):

* its waiting steps (``pending``, ``enqueued``, ``waiting_for_retry``) become ``cancelled``,
  with ``error_type = task_deadline_exceeded`` in their ``error`` (the failure they replace, if
  any, kept under ``previous``) and the reason in their transition row;
* the task becomes ``cancelled``, as after ``duplex cancel``: a result still to come is recorded
  but resumes nothing (no dependent enqueued, no retry scheduled, ``commit_outcomes``);
* one ``task.deadline_exceeded`` domain event goes to the outbox, numbered like every other.

Running attempts are not touched here: the worker running one learnt the deadline with its
claim and cancels it on time itself (``duplex.dispatch.pool``), committing it as
``task_deadline_exceeded``; that commit expires the task at once (``Committer``), so a
waiting step never outlives a deadline failure by a sweep interval.

Two ways in, both on every worker and without any message between workers: the periodic sweep
(``find_expired_tasks`` as a read, then ``expire_tasks``), and the commit of a running
attempt's deadline failure. Each locks the task rows first (the order of every writer, see
``duplex.storage.results``) and checks the task again under the lock, so a task is expired
exactly once however many workers race; claims take no task lock, so the steps are cancelled
by a state-guarded update and only the rows it changed get a transition.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Integer, bindparam, select, text, update

from duplex.errors import TASK_DEADLINE_EXCEEDED
from duplex.messages import DomainEvent, JSONDict
from duplex.states import CANCELLABLE, CANCELLED, IN_PROGRESS, TASK_CANCELLED, TASK_COMPLETE
from duplex.storage.driver import BulkStatement, db_json, db_time
from duplex.storage.listen import notify_new_events
from duplex.storage.models import OPEN_WITH_DEADLINE, domain_events, tasks, workflow_steps
from duplex.storage.outbox import next_sequences
from duplex.storage.task_state import lock_tasks
from duplex.storage.transitions import insert_transitions, transition_row

__all__ = ["ExpiredTask", "deadline_error", "expire_tasks", "find_expired_tasks"]

ws = workflow_steps

EVENT_NAME = "task.deadline_exceeded"


@dataclass(frozen=True, slots=True)
class ExpiredTask:
    """One task cancelled at its deadline."""

    task_uuid: str
    namespace: str
    deadline_at: datetime
    cancelled_steps: tuple[str, ...]  # names of the waiting steps cancelled
    running: int  # attempts still running: their workers cancel them


@dataclass
class ExpiryReport:
    """What one expiry transaction did: the tasks, and their events to announce after it."""

    expired: list[ExpiredTask] = field(default_factory=list)
    events: list[DomainEvent] = field(default_factory=list)


def deadline_error(deadline_at: datetime, *, ran: bool) -> JSONDict:
    """The ``error`` of a step stopped by its task's deadline (``ran``: while running)."""
    when = deadline_at.isoformat()
    message = (
        f"the task's deadline (max_duration) passed at {when} while this attempt ran"
        if ran
        else f"cancelled: the task's deadline (max_duration) passed at {when}"
    )
    return {"error_type": TASK_DEADLINE_EXCEEDED, "message": message, "retryable": False}


def find_expired_tasks(conn: Connection, *, now: datetime, limit: int = 200) -> list[str]:
    """Return up to ``limit`` unfinished tasks whose deadline has passed, earliest first.

    A read (no lock, no write transaction): the sweep runs every second on every worker, and
    on SQLite a write transaction with nothing to write would hold up every commit.
    """
    return list(conn.execute(_EXPIRED, {"now": now, "limit": limit}).scalars())


# Served by the partial index ``ix_tasks_open_deadline``: its predicate is repeated as text so
# that both databases see the index covers the query.
_EXPIRED = (
    select(tasks.c.task_uuid)
    .where(
        text(OPEN_WITH_DEADLINE),
        tasks.c.deadline_at <= bindparam("now", type_=tasks.c.deadline_at.type),
    )
    .order_by(tasks.c.deadline_at)
    .limit(bindparam("limit", type_=Integer))
)


def expire_tasks(
    conn: Connection, task_uuids: Iterable[str], *, now: datetime, worker_id: str
) -> ExpiryReport:
    """Expire those of ``task_uuids`` whose deadline has passed by ``now`` and that are not
    complete or cancelled, inside the caller's write transaction (see the module docstring).
    """
    report = ExpiryReport()
    states = lock_tasks(conn, task_uuids)
    open_ids = sorted(t for t, state in states.items() if state not in _SETTLED)
    if not open_ids:
        return report
    due = {
        row.task_uuid: row
        for row in conn.execute(_TASKS_DUE, {"ids": open_ids, "now": now})
        if row.deadline_at is not None
    }
    if not due:
        return report
    ids = sorted(due)
    waiting = list(conn.execute(_locked(conn, _WAITING_STEPS), {"ids": ids}))
    running: dict[str, int] = {}
    for (task_uuid,) in conn.execute(_RUNNING_STEPS, {"ids": ids}):
        running[task_uuid] = running.get(task_uuid, 0) + 1

    at = db_time(conn.dialect, now)
    updates = []
    transitions = []
    for step in waiting:
        deadline_at = due[step.task_uuid].deadline_at
        error = deadline_error(deadline_at, ran=False)
        if step.error:
            error["previous"] = step.error
        updates.append((db_json(error), None, at, at, step.step_uuid, step.state))
        transitions.append(
            transition_row(
                step.step_uuid,
                step.state,
                CANCELLED,
                step.attempts,
                worker_id,
                at,
                f"{TASK_DEADLINE_EXCEEDED}: the task's max_duration ended at "
                f"{deadline_at.isoformat()}",
            )
        )
    # Rows were read locked (PostgreSQL) or under BEGIN IMMEDIATE (SQLite); the state guard
    # is kept anyway, as on every other writer of step states.
    _CANCEL_STEP.execute(conn, updates)
    insert_transitions(conn, transitions)
    conn.execute(_CANCEL_TASKS, {"ids": ids, "now": now})

    names: dict[str, list[str]] = {task_uuid: [] for task_uuid in ids}
    for step in waiting:
        names[step.task_uuid].append(step.name)
    sequences = next_sequences(conn, ids)
    rows: list[dict[str, Any]] = []
    for task_uuid in ids:
        task = due[task_uuid]
        expired = ExpiredTask(
            task_uuid,
            task.namespace,
            task.deadline_at,
            tuple(names[task_uuid]),
            running.get(task_uuid, 0),
        )
        report.expired.append(expired)
        payload: JSONDict = {
            "error_type": TASK_DEADLINE_EXCEEDED,
            "deadline_at": task.deadline_at.isoformat(),
            "cancelled_steps": list(expired.cancelled_steps),
            "running_steps": expired.running,
        }
        sequence = sequences[task_uuid] + 1
        event = DomainEvent(str(uuid.uuid4()), EVENT_NAME, task_uuid, None, payload, now, sequence)
        report.events.append(event)
        rows.append(
            {
                "event_id": event.event_id,
                "name": EVENT_NAME,
                "task_uuid": task_uuid,
                "step_uuid": None,
                "payload": payload,
                "created_at": now,
                "sequence": sequence,
            }
        )
    conn.execute(domain_events.insert(), rows)
    notify_new_events(conn, report.events)
    return report


# A task already settled is left alone; one in ``error`` is not (a running attempt's deadline
# failure commits it to ``error`` just before the same transaction expires it).
_SETTLED = frozenset({TASK_COMPLETE, TASK_CANCELLED})

_TASKS_DUE = select(tasks.c.task_uuid, tasks.c.namespace, tasks.c.deadline_at).where(
    tasks.c.task_uuid.in_(bindparam("ids", expanding=True)),
    tasks.c.deadline_at <= bindparam("now", type_=tasks.c.deadline_at.type),
)
_WAITING_STEPS = (
    select(ws.c.step_uuid, ws.c.task_uuid, ws.c.name, ws.c.state, ws.c.attempts, ws.c.error)
    .where(ws.c.task_uuid.in_(bindparam("ids", expanding=True)), ws.c.state.in_(CANCELLABLE))
    .order_by(ws.c.task_uuid, ws.c.position)
)
_RUNNING_STEPS = select(ws.c.task_uuid).where(
    ws.c.task_uuid.in_(bindparam("ids", expanding=True)), ws.c.state == IN_PROGRESS
)
_CANCEL_STEP = BulkStatement(
    update(ws)
    .where(ws.c.step_uuid == bindparam("b_step_uuid"), ws.c.state == bindparam("b_state"))
    .values(
        state=CANCELLED,
        error=bindparam("v_error", type_=ws.c.error.type),
        next_attempt_at=bindparam("v_next_attempt_at", type_=ws.c.next_attempt_at.type),
        completed_at=bindparam("v_completed_at", type_=ws.c.completed_at.type),
        updated_at=bindparam("v_updated_at", type_=ws.c.updated_at.type),
    ),
    ("v_error", "v_next_attempt_at", "v_completed_at", "v_updated_at", "b_step_uuid", "b_state"),
)
_NOW = bindparam("now", type_=tasks.c.updated_at.type)
_CANCEL_TASKS = (
    update(tasks)
    .where(tasks.c.task_uuid.in_(bindparam("ids", expanding=True)))
    .values(state=TASK_CANCELLED, completed_at=_NOW, updated_at=_NOW)
)


def _locked(conn: Connection, query: Any) -> Any:
    return query.with_for_update() if conn.dialect.name == "postgresql" else query
