"""Handing claimed attempts back: claims that never started (a stop, a claim whose commit
was never confirmed) become ready again, their attempt not counted."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection, bindparam, select, update

from duplex.messages import ClaimedStep
from duplex.states import CANCELLED, ENQUEUED, IN_PROGRESS, TASK_CANCELLED
from duplex.storage.claims import STEP_COLUMNS, claimed_step
from duplex.storage.driver import db_time
from duplex.storage.models import workflow_steps
from duplex.storage.task_state import lock_tasks
from duplex.storage.transitions import insert_transitions, transition_row

ws = workflow_steps


def release_claims(
    conn: Connection, steps: Sequence[ClaimedStep], *, worker_id: str, now: datetime, reason: str
) -> int:
    """Hand back claimed attempts that never started; they become ready again at once.

    The attempt is not counted: the handler never ran. Guarded like a result, so a claim that
    was meanwhile recovered by another worker is left alone. A step whose task was cancelled
    meanwhile is not handed back to the queue: it becomes ``cancelled``.
    """
    released = 0
    task_states = lock_tasks(conn, {step.task_uuid for step in steps})
    for step in steps:
        cancelled = task_states.get(step.task_uuid) == TASK_CANCELLED
        to_state = CANCELLED if cancelled else ENQUEUED
        result = conn.execute(
            update(ws)
            .where(
                ws.c.step_uuid == step.step_uuid,
                ws.c.state == IN_PROGRESS,
                ws.c.attempts == step.attempt,
                ws.c.claimed_by == worker_id,
            )
            .values(
                state=to_state,
                attempts=ws.c.attempts - 1,
                claimed_by=None,
                claimed_at=None,
                next_attempt_at=None if cancelled else now,
                completed_at=now if cancelled else None,
                updated_at=now,
            )
        )
        if result.rowcount:
            released += 1
            insert_transitions(
                conn,
                [
                    transition_row(
                        step.step_uuid,
                        IN_PROGRESS,
                        to_state,
                        step.attempt - 1,
                        worker_id,
                        db_time(conn.dialect, now),
                        f"{reason}; task cancelled" if cancelled else reason,
                    )
                ],
            )
    return released


def release_unconfirmed_claim(
    conn: Connection, *, worker_id: str, claimed_at: datetime, now: datetime
) -> int:
    """Hand back what a claim transaction claimed if its outcome was never confirmed.

    When the connection drops around COMMIT, the claim may have committed without the worker
    hearing of it: those steps are this live worker's, so no one would recover them. Every
    claim stamps ``claimed_at`` with its own ``now``, which finds exactly its rows.
    """
    rows = conn.execute(
        select(*STEP_COLUMNS).where(
            ws.c.state == IN_PROGRESS,
            ws.c.claimed_by == worker_id,
            ws.c.claimed_at == bindparam("claimed_at", type_=ws.c.claimed_at.type),
        ),
        {"claimed_at": claimed_at},
    )
    steps = [claimed_step(row, claimed_by=worker_id) for row in rows]
    reason = "claim not confirmed (connection lost)"
    return release_claims(conn, steps, worker_id=worker_id, now=now, reason=reason)
