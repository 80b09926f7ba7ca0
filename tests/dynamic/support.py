"""A task with a wait step, driven by hand, and a snapshot of everything a signal may write."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from duplex.clock import utcnow
from duplex.storage.db import Database
from duplex.storage.models import (
    domain_events,
    step_signals,
    tasks,
    workflow_step_transitions,
    workflow_steps,
)
from duplex.storage.signals import SignalReport, send_signal
from tests.storage.support import OPERATOR, Flow

# prepare -> approval (waits for the signal "approved", at most a minute) -> ship, notify.
APPROVAL = """
name = "ops"
[[steps]]
name = "prepare"
handler = "t.h"
[[steps]]
name = "approval"
kind = "wait"
signal = "approved"
timeout_ms = 60000
depends_on = ["prepare"]
[[steps]]
name = "ship"
handler = "t.h"
depends_on = ["approval"]
[[steps]]
name = "notify"
handler = "t.h"
depends_on = ["approval"]
"""

# prepare -> pause (sleeps 5 minutes) -> ship.
NAP = """
name = "ops"
[[steps]]
name = "prepare"
handler = "t.h"
[[steps]]
name = "pause"
kind = "sleep"
duration = "5m"
depends_on = ["prepare"]
[[steps]]
name = "ship"
handler = "t.h"
depends_on = ["pause"]
"""


def signal(
    flow: Flow,
    name: str = "approved",
    payload: Any = None,
    *,
    signal_id: str | None = None,
    task: str | None = None,
    now: datetime | None = None,
) -> SignalReport:
    with flow.db.write() as conn:
        return send_signal(
            conn,
            task or flow.task,
            name,
            payload,
            signal_id=signal_id,
            sent_by=OPERATOR,
            now=now or utcnow(),
        )


def start_wait(flow: Flow) -> None:
    """Run ``prepare``: the step after it starts waiting."""
    (prepare,) = flow.claim("prepare")
    flow.run(prepare)


def snapshot(db: Database, task: str | None = None) -> tuple[Any, ...]:
    """Every row a signal, a sweep or an operator command may write or change (of ``task``
    only, if given: every other task's rows stay as they are anyway)."""
    signals, steps, rows = select(step_signals), select(workflow_steps), select(tasks)
    events = select(func.count()).select_from(domain_events)
    moves = select(func.count()).select_from(workflow_step_transitions)
    if task is not None:
        signals = signals.where(step_signals.c.task_uuid == task)
        steps = steps.where(workflow_steps.c.task_uuid == task)
        rows = rows.where(tasks.c.task_uuid == task)
        events = events.where(domain_events.c.task_uuid == task)
        moves = moves.where(
            workflow_step_transitions.c.step_uuid.in_(
                select(workflow_steps.c.step_uuid).where(workflow_steps.c.task_uuid == task)
            )
        )
    with db.read() as conn:
        return (
            conn.execute(signals.order_by(step_signals.c.id)).all(),
            conn.execute(moves).scalar(),
            conn.execute(events).scalar(),
            conn.execute(steps.order_by(workflow_steps.c.step_uuid)).all(),
            conn.execute(rows.order_by(tasks.c.task_uuid)).all(),
        )


def signal_rows(flow: Flow) -> list[Any]:
    with flow.db.read() as conn:
        return list(
            conn.execute(
                select(step_signals)
                .where(step_signals.c.task_uuid == flow.task)
                .order_by(step_signals.c.id)
            )
        )


def events_of(flow: Flow, step: str) -> list[tuple[str, Any]]:
    step_uuid = flow.uuid_of(step)
    with flow.db.read() as conn:
        rows = conn.execute(
            select(domain_events.c.name, domain_events.c.payload)
            .where(domain_events.c.step_uuid == step_uuid)
            .order_by(domain_events.c.sequence)
        )
        return [(row.name, row.payload) for row in rows]
