"""Task state: locking task rows before touching their steps, and bringing each task's state
in line with its steps (``app.states.derive_task_state``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, exists, select, update

from app.models import (
    tasks,
    workflow_steps,
)
from app.states import (
    STEP_STATES,
    TASK_FINISHED,
    derive_task_state,
)

ws = workflow_steps


def lock_tasks(conn: Connection, task_uuids: Iterable[str]) -> dict[str, str]:
    """Lock the task rows (PostgreSQL ``FOR UPDATE``, in uuid order) and return their states.

    Call it before touching the tasks' steps, so every writer takes locks in one order.
    """
    ids = sorted(set(task_uuids))
    if not ids:
        return {}
    query = _LOCK_TASKS if conn.dialect.name == "postgresql" else _TASK_STATES
    return {task_uuid: state for task_uuid, state in conn.execute(query, {"ids": ids})}


_TASK_STATES = select(tasks.c.task_uuid, tasks.c.state).where(
    tasks.c.task_uuid.in_(bindparam("ids", expanding=True))
)
# PostgreSQL locks rows as the sorted result is produced: a deadlock-free order.
_LOCK_TASKS = _TASK_STATES.order_by(tasks.c.task_uuid).with_for_update()


def update_task_states(
    conn: Connection,
    task_uuids: Iterable[str],
    *,
    now: datetime,
    locked_states: Mapping[str, str] | None = None,
) -> None:
    """Bring each task's state in line with its steps (see ``derive_task_state``).

    ``locked_states`` are the states ``lock_tasks`` read in this transaction, if at hand.
    """
    ids = sorted(set(task_uuids))
    if locked_states is None:
        locked_states = {t: s for t, s in conn.execute(_TASK_STATES, {"ids": ids})}
    current = {
        task_uuid: locked_states[task_uuid] for task_uuid in ids if task_uuid in locked_states
    }
    for task_uuid, state in current.items():
        new_state = derive_task_state(state, _states_present(conn, task_uuid))
        if new_state == state:
            continue
        values: dict[str, Any] = {"state": new_state, "updated_at": now}
        values["completed_at"] = now if new_state in TASK_FINISHED else None
        conn.execute(update(tasks).where(tasks.c.task_uuid == task_uuid).values(**values))


def _states_present(conn: Connection, task_uuid: str) -> dict[str, int]:
    """Return {state: 1} for each state some step of the task is in.

    One probe per state on the (task_uuid, state) index, so the cost does not grow with the
    size of the task (counting every step of a 5000-step task on each commit did).
    """
    row = conn.execute(_STATES_PRESENT, {"task_uuid": task_uuid}).one()
    return {state: 1 for state in STEP_STATES if row._mapping[state]}


_STATES_PRESENT = select(
    *[
        exists().where(ws.c.task_uuid == bindparam("task_uuid"), ws.c.state == state).label(state)
        for state in STEP_STATES
    ]
)
