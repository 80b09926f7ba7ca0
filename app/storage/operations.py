"""Operator commands: cancel a task, retry a failed step, resolve a step by hand.

Plain functions on a write ``Connection``. Each one locks the task row first (the order every
writer follows, see ``duplex.storage.results``), checks that the change is possible, and only
then writes:
the step rows, one transition row per step change (``worker_id`` = the operator, ``reason`` =
what was done and why), dependents made ready, and the task state. An impossible change raises
``TransitionError`` and an unknown uuid ``InputError`` before anything is written, each with a
one-line message.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, select, update

from duplex.errors import InputError, TransitionError
from duplex.states import (
    CANCELLABLE,
    CANCELLED,
    ENQUEUED,
    ERROR,
    IN_PROGRESS,
    PENDING,
    RESOLVED_MANUALLY,
    STEP_TRANSITIONS,
    TASK_CANCELLED,
    TASK_COMPLETE,
)
from duplex.storage.driver import db_time
from duplex.storage.models import tasks, workflow_steps
from duplex.storage.queries import parse_uuid
from duplex.storage.readiness import enqueue_ready_dependents
from duplex.storage.task_state import lock_tasks, update_task_states
from duplex.storage.transitions import insert_transitions, transition_row

__all__ = [
    "OperatorReport",
    "StepChange",
    "cancel_task",
    "operator_identity",
    "resolve_step",
    "retry_step",
]

ws = workflow_steps


@dataclass(frozen=True, slots=True)
class StepChange:
    """One step moved by an operator command (or made ready by it)."""

    step_uuid: str
    name: str
    from_state: str
    to_state: str


@dataclass(frozen=True, slots=True)
class OperatorReport:
    """What an operator command did."""

    action: str  # "cancel", "retry" or "resolve"
    task_uuid: str
    task_state: str
    changes: tuple[StepChange, ...]
    still_running: int = 0

    @property
    def made_ready(self) -> bool:
        """Whether a step became ready to claim (a retry; a resolve that unblocked another)."""
        return any(change.to_state == ENQUEUED for change in self.changes)

    @property
    def summary(self) -> str:
        """One line saying what was done: what ``duplex cancel/retry/resolve`` prints, and
        what the dashboard shows."""
        if self.action == "cancel":
            line = f"cancelled task {self.task_uuid}: {len(self.changes)} step(s) cancelled"
            if self.still_running:
                line += (
                    f"; {self.still_running} running step(s) will finish "
                    f"without resuming the workflow"
                )
            return line
        first, *unblocked = self.changes
        if self.action == "retry":
            return (
                f"step {first.name} ({first.step_uuid}) enqueued for one more attempt; "
                f"task {self.task_uuid} is {self.task_state}"
            )
        line = f"step {first.name} ({first.step_uuid}) resolved manually"
        ready = [change.name for change in unblocked if change.to_state == ENQUEUED]
        if ready:
            line += f"; enqueued {', '.join(ready)}"
        return f"{line}; task {self.task_uuid} is {self.task_state}"


def operator_identity() -> str:
    """Return who is running the command, as written to ``worker_id`` of transition rows."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name (e.g. a container user without a passwd entry)
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"operator:{user}"


def cancel_task(
    conn: Connection,
    task_uuid: str,
    *,
    operator: str,
    now: datetime,
    reason: str | None = None,
) -> OperatorReport:
    """Cancel a task: steps not yet running are cancelled; running ones finish.

    The results of steps still running are recorded when they arrive, but they do not resume
    the workflow: no dependent is enqueued and no retry is scheduled (``commit_outcomes``).
    """
    task_id = parse_uuid(task_uuid, "task")
    state = lock_tasks(conn, [task_id]).get(task_id)
    if state is None:
        raise InputError(f"unknown task: {task_uuid}")
    if state == TASK_CANCELLED:
        raise TransitionError(f"cannot cancel task {task_id}: it is already cancelled")
    if state == TASK_COMPLETE:
        raise TransitionError(f"cannot cancel task {task_id}: it is already complete")

    query = (
        select(ws.c.step_uuid, ws.c.name, ws.c.state, ws.c.attempts)
        .where(ws.c.task_uuid == task_id, ws.c.state.in_(CANCELLABLE))
        .order_by(ws.c.position)
    )
    steps = list(conn.execute(_for_update(conn, query)))
    if steps:
        conn.execute(
            update(ws)
            .where(ws.c.step_uuid.in_([s.step_uuid for s in steps]))
            .values(state=CANCELLED, next_attempt_at=None, completed_at=now, updated_at=now)
        )
    why = _why("cancelled by operator", reason)
    _write_transitions(
        conn, [(s.step_uuid, s.state, CANCELLED, s.attempts, why) for s in steps], operator, now
    )
    conn.execute(
        update(tasks)
        .where(tasks.c.task_uuid == task_id)
        .values(state=TASK_CANCELLED, completed_at=now, updated_at=now)
    )
    running = conn.execute(
        select(ws.c.step_uuid).where(ws.c.task_uuid == task_id, ws.c.state == IN_PROGRESS)
    ).all()
    return OperatorReport(
        "cancel",
        task_id,
        TASK_CANCELLED,
        tuple(StepChange(s.step_uuid, s.name, s.state, CANCELLED) for s in steps),
        still_running=len(running),
    )


def retry_step(
    conn: Connection,
    step_uuid: str,
    *,
    operator: str,
    now: datetime,
    reason: str | None = None,
) -> OperatorReport:
    """Give a step in ``error`` one more attempt: back to ``enqueued``, task back in progress.

    If its attempts are used up, ``max_attempts`` is raised to allow exactly one more.
    """
    step = _locked_step(conn, step_uuid)
    _check_task_open(conn, step, "retry")
    if step.state != ERROR:
        raise TransitionError(
            f"cannot retry step {step.name!r} ({step.step_uuid}): it is {step.state}; "
            f"only a step in error can be retried"
        )
    max_attempts = max(step.max_attempts, step.attempts + 1)
    conn.execute(
        update(ws)
        .where(ws.c.step_uuid == step.step_uuid, ws.c.state == ERROR)
        .values(
            state=ENQUEUED,
            max_attempts=max_attempts,
            next_attempt_at=now,
            claimed_by=None,
            claimed_at=None,
            completed_at=None,
            updated_at=now,
        )
    )
    why = _why("retried by operator", reason)
    if max_attempts != step.max_attempts:
        why += f" (max_attempts raised to {max_attempts})"
    _write_transitions(conn, [(step.step_uuid, ERROR, ENQUEUED, step.attempts, why)], operator, now)
    update_task_states(conn, [step.task_uuid], now=now)
    return OperatorReport(
        "retry",
        step.task_uuid,
        _task_state(conn, step.task_uuid),
        (StepChange(step.step_uuid, step.name, ERROR, ENQUEUED),),
    )


def resolve_step(
    conn: Connection,
    step_uuid: str,
    *,
    operator: str,
    now: datetime,
    reason: str | None = None,
) -> OperatorReport:
    """Mark a step ``resolved_manually``; dependents whose parents are all done are enqueued.

    Any step that is not running and not finished can be resolved: one in error, or one that
    has not run yet (pending, enqueued, waiting for a retry), which is then skipped.
    """
    step = _locked_step(conn, step_uuid)
    _check_task_open(conn, step, "resolve")
    if RESOLVED_MANUALLY not in STEP_TRANSITIONS.get(step.state, frozenset()):
        allowed = sorted(
            s for s, targets in STEP_TRANSITIONS.items() if RESOLVED_MANUALLY in targets
        )
        raise TransitionError(
            f"cannot resolve step {step.name!r} ({step.step_uuid}): it is {step.state}; "
            f"only a step that is {', '.join(allowed)} can be resolved"
        )
    conn.execute(
        update(ws)
        .where(ws.c.step_uuid == step.step_uuid, ws.c.state == step.state)
        .values(state=RESOLVED_MANUALLY, next_attempt_at=None, completed_at=now, updated_at=now)
    )
    why = _why("resolved by operator", reason)
    moves = [(step.step_uuid, step.state, RESOLVED_MANUALLY, step.attempts, why)]
    changes = [StepChange(step.step_uuid, step.name, step.state, RESOLVED_MANUALLY)]
    ready = [r.step_uuid for r in enqueue_ready_dependents(conn, [step.step_uuid], now=now)]
    if ready:
        names = dict(
            conn.execute(select(ws.c.step_uuid, ws.c.name).where(ws.c.step_uuid.in_(ready))).all()
        )
        for child in ready:
            moves.append((child, PENDING, ENQUEUED, 0, "dependencies complete"))
            changes.append(StepChange(child, names[child], PENDING, ENQUEUED))
    _write_transitions(conn, moves, operator, now)
    update_task_states(conn, [step.task_uuid], now=now)
    return OperatorReport(
        "resolve", step.task_uuid, _task_state(conn, step.task_uuid), tuple(changes)
    )


def _locked_step(conn: Connection, step_uuid: str) -> Row[Any]:
    """Lock the step's task, then read (and on PostgreSQL lock) the step."""
    step_id = parse_uuid(step_uuid, "step")
    task_uuid = conn.execute(
        select(ws.c.task_uuid).where(ws.c.step_uuid == step_id)
    ).scalar_one_or_none()
    if task_uuid is None:
        raise InputError(f"unknown step: {step_uuid}")
    lock_tasks(conn, [task_uuid])
    query = select(
        ws.c.step_uuid,
        ws.c.task_uuid,
        ws.c.name,
        ws.c.state,
        ws.c.attempts,
        ws.c.max_attempts,
    ).where(ws.c.step_uuid == step_id)
    return conn.execute(_for_update(conn, query)).one()


def _check_task_open(conn: Connection, step: Row[Any], verb: str) -> None:
    state = _task_state(conn, step.task_uuid)
    if state == TASK_CANCELLED:
        raise TransitionError(
            f"cannot {verb} step {step.name!r} ({step.step_uuid}): "
            f"its task {step.task_uuid} is cancelled"
        )


def _task_state(conn: Connection, task_uuid: str) -> str:
    return str(
        conn.execute(select(tasks.c.state).where(tasks.c.task_uuid == task_uuid)).scalar_one()
    )


def _for_update(conn: Connection, query: Any) -> Any:
    return query.with_for_update() if conn.dialect.name == "postgresql" else query


def _why(action: str, reason: str | None) -> str:
    reason = " ".join((reason or "").split())
    return f"{action}: {reason}" if reason else action


def _write_transitions(
    conn: Connection,
    moves: Sequence[tuple[str, str, str, int, str]],
    operator: str,
    now: datetime,
) -> None:
    at = db_time(conn.dialect, now)
    insert_transitions(
        conn,
        [
            transition_row(step_uuid, from_state, to_state, attempt, operator, at, why)
            for step_uuid, from_state, to_state, attempt, why in moves
        ],
    )
