"""Cancelling what is running: ``duplex cancel --step``, and the read each worker's sweep makes
to find the attempts it runs that were cancelled.

Neither ``duplex cancel TASK`` nor ``duplex cancel --step STEP`` talks to a worker: they write
SQL (the task ``cancelled``; the step's ``cancel_requested_at``), and every worker, at its
sweep (every ``worker.deadline_sweep_interval_ms``, with the deadline sweep), reads its own
running attempts that either marks (``find_cancelled_attempts``). Its Dispatcher then cancels
them as it cancels an attempt at its task's deadline (``ctx.cancelled`` set, an ``async def``
handler cancelled, the slot given to a fresh HandlerWorker) and commits the attempt as
``error_type = cancelled``, which ends the step ``cancelled`` (``duplex.commit.retry``);
whatever the handler returns afterwards is rejected by the commit guard.

A cancel request stays on the step until ``duplex retry`` clears it: if the attempt ended on its
own before its worker heard of the request and the step waits for a retry, the next attempt is
cancelled as soon as its worker's sweep sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Integer, bindparam, or_, select, update

from duplex.errors import CANCELLED as CANCELLED_ERROR
from duplex.errors import TransitionError
from duplex.messages import JSONDict
from duplex.states import CANCELLABLE, CANCELLED, IN_PROGRESS, TASK_CANCELLED
from duplex.storage.models import tasks, workflow_steps
from duplex.storage.operations import (
    OperatorReport,
    check_task_open,
    locked_step,
    operator_reason,
    step_moved,
    task_state_of,
)

__all__ = ["RunningCancel", "cancel_error", "cancel_step", "find_cancelled_attempts"]

ws = workflow_steps


@dataclass(frozen=True, slots=True)
class RunningCancel:
    """A running attempt to cancel: its task was cancelled, or (``step_only``) the step."""

    step_uuid: str
    attempt: int
    step_only: bool


def find_cancelled_attempts(conn: Connection, *, me: str, limit: int = 500) -> list[RunningCancel]:
    """Return ``me``'s running attempts whose task was cancelled or whose step has a cancel
    request. A read (no lock, no write transaction): it runs every sweep on every worker."""
    rows = conn.execute(_CANCELLED_ATTEMPTS, {"me": me, "limit": limit})
    return [RunningCancel(r.step_uuid, r.attempts, r.task_state != TASK_CANCELLED) for r in rows]


# Served by the claim index, whose first column is ``state``: only running attempts are read
# (at most the slots of all workers), and the task by its primary key.
_CANCELLED_ATTEMPTS = (
    select(ws.c.step_uuid, ws.c.attempts, tasks.c.state.label("task_state"))
    .join(tasks, tasks.c.task_uuid == ws.c.task_uuid)
    .where(
        ws.c.state == IN_PROGRESS,
        ws.c.claimed_by == bindparam("me"),
        or_(tasks.c.state == TASK_CANCELLED, ws.c.cancel_requested_at.is_not(None)),
    )
    .limit(bindparam("limit", type_=Integer))
)


def cancel_error(message: str) -> JSONDict:
    """The ``error`` of a step an operator cancelled before it ran."""
    return {"error_type": CANCELLED_ERROR, "message": message, "retryable": False}


def cancel_step(
    conn: Connection,
    step_uuid: str,
    *,
    operator: str,
    now: datetime,
    reason: str | None = None,
) -> OperatorReport:
    """Cancel one step of a task that goes on.

    A step that has not started (pending, enqueued, waiting for a retry or a signal) is
    cancelled at once; a running one gets a cancel request that its worker's sweep carries out
    (the report's ``still_running``); a finished one is refused. Its dependents can no longer
    run, as after an error: the task ends ``error`` once nothing else can run, and ``duplex
    retry`` of the step brings it back.
    """
    step = locked_step(conn, step_uuid)
    check_task_open(conn, step, "cancel")
    subject = f"{step.name!r} ({step.step_uuid})"
    reason_text = operator_reason("cancelled by operator", reason)
    if step.state == IN_PROGRESS:
        # The first request stands; asking again changes nothing.
        conn.execute(
            update(ws)
            .where(
                ws.c.step_uuid == step.step_uuid,
                ws.c.state == IN_PROGRESS,
                ws.c.cancel_requested_at.is_(None),
            )
            .values(cancel_requested_at=now, updated_at=now)
        )
        return OperatorReport(
            "cancel_step",
            step.task_uuid,
            task_state_of(conn, step.task_uuid),
            (),
            still_running=1,
            subject=subject,
        )
    if step.state not in CANCELLABLE:
        allowed = ", ".join((*CANCELLABLE, IN_PROGRESS))
        raise TransitionError(
            f"cannot cancel step {subject}: it is {step.state}; only a step that has not "
            f"finished ({allowed}) can be cancelled"
        )
    error = cancel_error(f"{reason_text} before it ran")
    if step.error:
        error["previous"] = step.error
    conn.execute(
        update(ws)
        .where(ws.c.step_uuid == step.step_uuid, ws.c.state == step.state)
        .values(
            state=CANCELLED,
            error=error,
            next_attempt_at=None,
            completed_at=now,
            updated_at=now,
        )
    )
    return step_moved(
        conn,
        "cancel_step",
        step,
        CANCELLED,
        reason_text,
        operator=operator,
        now=now,
        subject=subject,
    )
