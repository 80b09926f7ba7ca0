"""Operator commands: cancel a task, retry a failed step, resolve or complete a step by hand.

Plain functions on a write ``Connection``. Each one locks the task row first (the order every
writer follows, see ``duplex.storage.results``), checks that the change is possible, and only
then writes:
the step rows, one transition row per step change (``worker_id`` = the operator, ``reason`` =
what was done and why), the task moved on as after a result (``advance``: dependents made
ready, waits started; ``duplex.storage.manual``), the events of a step completed by hand, and
the task state. An impossible change raises ``TransitionError`` and an unknown uuid
``InputError`` before anything is written, each with a one-line message.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, select, update

from duplex.dynamic.specs import wait_until
from duplex.errors import InputError, TransitionError
from duplex.messages import DomainEvent, JSONDict
from duplex.states import (
    CANCELLABLE,
    CANCELLED,
    COMPLETABLE,
    COMPLETE,
    ENQUEUED,
    ERROR,
    IN_PROGRESS,
    RESOLVED_MANUALLY,
    SKIPPED,
    STEP_TRANSITIONS,
    TASK_CANCELLED,
    TASK_COMPLETE,
    WAITING,
)
from duplex.storage.driver import db_time
from duplex.storage.manual import finish_by_hand
from duplex.storage.models import tasks, workflow_steps
from duplex.storage.queries import parse_uuid
from duplex.storage.task_state import lock_tasks, update_task_states
from duplex.storage.transitions import insert_transitions, transition_row

__all__ = [
    "OperatorReport",
    "StepChange",
    "cancel_task",
    "complete_step",
    "operator_identity",
    "resolve_step",
    "retry_step",
]

ws = workflow_steps
_RESOLVABLE = tuple(s for s, targets in STEP_TRANSITIONS.items() if RESOLVED_MANUALLY in targets)


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

    action: str  # "cancel", "cancel_step", "retry", "resolve" or "complete"
    task_uuid: str
    task_state: str
    changes: tuple[StepChange, ...]
    still_running: int = 0
    # The events written (a step completed by hand, and waits a stored signal completed).
    events: tuple[DomainEvent, ...] = ()
    # ``cancel_step``: the step, as "'name' (uuid)" (it may have moved nowhere yet).
    subject: str = ""

    @property
    def made_ready(self) -> bool:
        """Whether a step became ready to claim (a retry; a resolve that unblocked another)."""
        return any(change.to_state == ENQUEUED for change in self.changes)

    @property
    def summary(self) -> str:
        """One line saying what was done: what ``duplex cancel/retry/resolve/complete``
        prints, and what the dashboard shows."""
        if self.action == "cancel":
            line = f"cancelled task {self.task_uuid}: {len(self.changes)} step(s) cancelled"
            if self.still_running:
                line += f"; {self.still_running} running attempt(s) asked to stop"
            return line
        if self.action == "cancel_step":
            if self.still_running:
                return (
                    f"step {self.subject} is running: its attempt was asked to stop; "
                    f"task {self.task_uuid} is {self.task_state}"
                )
            return f"step {self.subject} cancelled; task {self.task_uuid} is {self.task_state}"
        first, *unblocked = self.changes
        if self.action == "retry":
            again = "waiting once more" if first.to_state == WAITING else "enqueued"
            return (
                f"step {first.name} ({first.step_uuid}) {again} for one more attempt; "
                f"task {self.task_uuid} is {self.task_state}"
            )
        done = "completed by hand" if self.action == "complete" else "resolved manually"
        line = f"step {first.name} ({first.step_uuid}) {done}"
        for state, what in ((ENQUEUED, "enqueued"), (WAITING, "waiting"), (SKIPPED, "skipped")):
            moved = [change.name for change in unblocked if change.to_state == state]
            if moved:
                line += f"; {what} {', '.join(moved)}"
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
    """Cancel a task: steps not yet running are cancelled now; running ones are cancelled by
    their workers, each at its next sweep (``duplex.storage.cancels``), every step ending
    ``cancelled``.

    A result that arrives before its worker heard of the cancel is recorded, but it does not
    resume the workflow: no dependent is enqueued and no retry is scheduled
    (``commit_outcomes``).
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
    why = operator_reason("cancelled by operator", reason)
    write_transitions(
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
    """Give a step in ``error`` (or ``cancelled`` on its own, ``duplex cancel --step``) one
    more attempt: back to ``enqueued``, task back in progress; its cancel request is cleared.

    If its attempts are used up, ``max_attempts`` is raised to allow exactly one more. A wait
    step that timed out (``wait_timeout``) waits once more instead, its timeout counted from
    now: no handler runs it, so enqueuing it would have no one to claim it.
    """
    step = locked_step(conn, step_uuid)
    check_task_open(conn, step, "retry")
    if step.state not in (ERROR, CANCELLED):
        raise TransitionError(
            f"cannot retry step {step.name!r} ({step.step_uuid}): it is {step.state}; "
            f"only a step in error or cancelled can be retried"
        )
    max_attempts = max(step.max_attempts, step.attempts + 1)
    again = wait_until(step.kind, step.spec, now)
    to_state, next_at = (ENQUEUED, now) if again is None else (WAITING, again.at)
    conn.execute(
        update(ws)
        .where(ws.c.step_uuid == step.step_uuid, ws.c.state == step.state)
        .values(
            state=to_state,
            cancel_requested_at=None,
            max_attempts=max_attempts,
            next_attempt_at=next_at,
            claimed_by=None,
            claimed_at=None,
            completed_at=None,
            updated_at=now,
        )
    )
    why = operator_reason("retried by operator", reason)
    if again is not None:
        why += f"; {again.reason}"
    elif max_attempts != step.max_attempts:
        why += f" (max_attempts raised to {max_attempts})"
    return step_moved(conn, "retry", step, to_state, why, operator=operator, now=now)


def resolve_step(
    conn: Connection,
    step_uuid: str,
    *,
    operator: str,
    now: datetime,
    reason: str | None = None,
) -> OperatorReport:
    """Mark a step ``resolved_manually``; dependents whose parents are all done go on.

    Any step that is not running and not finished can be resolved: one in error, or one that
    has not run yet (pending, enqueued, waiting for a retry or for a signal), which is then
    skipped. The task moves on as after a result (``advance``): a wait step after it starts
    waiting rather than being enqueued.
    """
    return _finish_by_hand(conn, step_uuid, RESOLVED_MANUALLY, None, operator, now, reason)


def complete_step(
    conn: Connection,
    step_uuid: str,
    result: JSONDict,
    *,
    operator: str,
    now: datetime,
    reason: str | None = None,
) -> OperatorReport:
    """Complete a step by hand with ``result`` (a JSON object), which its dependents read as
    if its handler had returned it; they go on as after a result. Allowed from the states
    ``resolve_step`` accepts (``duplex.states.COMPLETABLE``)."""
    if not isinstance(result, dict):
        raise InputError(f"a step's result must be a JSON object, not {type(result).__name__}")
    return _finish_by_hand(conn, step_uuid, COMPLETE, result, operator, now, reason)


def _finish_by_hand(
    conn: Connection,
    step_uuid: str,
    to_state: str,
    result: JSONDict | None,
    operator: str,
    now: datetime,
    reason: str | None,
) -> OperatorReport:
    action, verb = ("complete", "completed") if to_state == COMPLETE else ("resolve", "resolved")
    step = locked_step(conn, step_uuid)
    check_task_open(conn, step, action)
    # Only an attempt moves a step out of in_progress: COMPLETABLE leaves it out.
    allowed = COMPLETABLE if to_state == COMPLETE else _RESOLVABLE
    if step.state not in allowed:
        raise TransitionError(
            f"cannot {action} step {step.name!r} ({step.step_uuid}): it is {step.state}; "
            f"only a step that is {', '.join(sorted(allowed))} can be {verb}"
        )
    why = operator_reason(f"{verb} by operator", reason)
    moved, events = finish_by_hand(
        conn, step, to_state, result, operator=operator, now=now, why=why
    )
    return OperatorReport(
        action,
        step.task_uuid,
        task_state_of(conn, step.task_uuid),
        tuple(StepChange(*m) for m in moved),
        events=tuple(events),
    )


def locked_step(conn: Connection, step_uuid: str) -> Row[Any]:
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
        ws.c.kind,
        ws.c.spec,
        ws.c.declared_events,
        ws.c.error,
    ).where(ws.c.step_uuid == step_id)
    return conn.execute(_for_update(conn, query)).one()


def check_task_open(conn: Connection, step: Row[Any], verb: str) -> None:
    state = task_state_of(conn, step.task_uuid)
    if state == TASK_CANCELLED:
        raise TransitionError(
            f"cannot {verb} step {step.name!r} ({step.step_uuid}): "
            f"its task {step.task_uuid} is cancelled"
        )


def step_moved(
    conn: Connection,
    action: str,
    step: Row[Any],
    to_state: str,
    why: str,
    *,
    operator: str,
    now: datetime,
    subject: str = "",
) -> OperatorReport:
    """Record an operator's move of one step (read with ``locked_step``, already updated to
    ``to_state``): its transition, its task's state, and the report of it."""
    write_transitions(
        conn, [(step.step_uuid, step.state, to_state, step.attempts, why)], operator, now
    )
    update_task_states(conn, [step.task_uuid], now=now)
    return OperatorReport(
        action,
        step.task_uuid,
        task_state_of(conn, step.task_uuid),
        (StepChange(step.step_uuid, step.name, step.state, to_state),),
        subject=subject,
    )


def task_state_of(conn: Connection, task_uuid: str) -> str:
    return str(
        conn.execute(select(tasks.c.state).where(tasks.c.task_uuid == task_uuid)).scalar_one()
    )


def _for_update(conn: Connection, query: Any) -> Any:
    return query.with_for_update() if conn.dialect.name == "postgresql" else query


def operator_reason(action: str, reason: str | None) -> str:
    reason = " ".join((reason or "").split())
    return f"{action}: {reason}" if reason else action


def write_transitions(
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
