"""Task state: locking task rows before touching their steps, bringing each task's state
in line with its steps (``duplex.states.derive_task_state``), and marking tasks started when
their first steps are claimed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    ScalarSelect,
    String,
    bindparam,
    column,
    literal_column,
    select,
    text,
    update,
)

from duplex.states import (
    STEP_STATES,
    TASK_FINISHED,
    TASK_IN_PROGRESS,
    TASK_PENDING,
    derive_task_state,
)
from duplex.storage.direct import DirectStatement
from duplex.storage.driver import BulkStatement, db_time
from duplex.storage.models import (
    tasks,
    unindexed,
    workflow_steps,
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
    return {task_uuid: state for task_uuid, state in query.rows(conn, {"ids": ids})}


_TASK_STATES_READ = select(tasks.c.task_uuid, tasks.c.state).where(
    tasks.c.task_uuid.in_(bindparam("ids", expanding=True))
)
_TASK_STATES = DirectStatement(_TASK_STATES_READ)
# PostgreSQL locks rows as the sorted result is produced: a deadlock-free order.
_LOCK_TASKS = DirectStatement(_TASK_STATES_READ.order_by(tasks.c.task_uuid).with_for_update())


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
        locked_states = {t: s for t, s in _TASK_STATES.rows(conn, {"ids": ids})}
    current = {
        task_uuid: locked_states[task_uuid] for task_uuid in ids if task_uuid in locked_states
    }
    if not current:
        return
    present = states_present(conn, current)
    at = db_time(conn.dialect, now)
    changes = []
    for task_uuid, state in current.items():
        new_state = derive_task_state(state, present[task_uuid])
        if new_state != state:
            finished_at = at if new_state in TASK_FINISHED else None
            changes.append((new_state, at, finished_at, task_uuid))
    _SET_TASK_STATE.execute(conn, changes)


def states_present(conn: Connection, task_uuids: Iterable[str]) -> dict[str, dict[str, int]]:
    """The states the steps of each task are in (as ``derive_task_state`` takes them)."""
    ids = list(task_uuids)
    present: dict[str, dict[str, int]] = {task_uuid: {} for task_uuid in ids}
    if conn.dialect.name == "postgresql":
        for task_uuid, states in _DISTINCT_STATES.rows(conn, {"ids": ids}):
            # NULL past the last state present
            present[task_uuid] = dict.fromkeys((state for state in states if state), 1)
        return present
    for task_uuid, *probes in _STATES_PRESENT.rows(conn, {"ids": ids}):
        present[task_uuid] = {
            state: 1 for state, hit in zip(STEP_STATES, probes, strict=True) if hit
        }
    return present


# Both reads cost what the tasks in the batch cost, never what their size does (counting
# every step of a 5000-step task on each commit did), and one statement serves the whole
# batch; each runs through the (task_uuid, state) index only.
#
# SQLite: a row per task with one probe of the index per state, each a ``LIMIT 1`` subquery
# in the select list (PostgreSQL turned an EXISTS in WHERE into a semi-join, and one in the
# select list into a hashed subplan, each reading the whole steps table). The states are
# Duplex's own constants, written into the SQL.
def _probe(state: str, task_uuid: ColumnElement[str]) -> ScalarSelect[Any]:
    return (
        select(literal_column("1"))
        .where(ws.c.task_uuid == task_uuid, ws.c.state == literal_column(f"'{state}'"))
        .limit(literal_column("1"))
        .scalar_subquery()
    )


_STATES_PRESENT = DirectStatement(
    select(
        tasks.c.task_uuid,
        *[_probe(state, tasks.c.task_uuid).label(state) for state in STEP_STATES],
    ).where(tasks.c.task_uuid.in_(bindparam("ids", expanding=True)))
)


# PostgreSQL: each task's distinct states, read as a skip scan of the index: its first state,
# the first one after that, ... (one lateral subquery per state there can be; those past the
# last state present find nothing at once). Probes of a given state were planned on the claim
# index (state, ...) and walked every step in that state to find the task's: without
# statistics, or with ones taken when those states were rare, both paths look like one row
# to the planner. For ``min(state)`` of ``task_uuid = :t AND state > :s`` only (task_uuid,
# state) takes both conditions as bounds, and the planner takes it. (A recursive CTE said the
# same in fewer lines; in ``duplex run`` it cost the server 0.05 ms more per single-step task.)
# The tasks are the values of one array parameter (``unnest``), not rows of ``tasks`` found
# by an IN list: the statement's text is the same for any number of tasks, so it is prepared
# once, and no plan scans ``tasks`` (without statistics, PostgreSQL compared every row of it
# with every value of a batch's list: 5-7 ms per commit of 200 tasks).
def _distinct_states_sql(count: int) -> str:
    after = [""] + [f" AND w.state > s{i - 1}.state" for i in range(1, count)]
    firsts = " ".join(
        "LEFT JOIN LATERAL (SELECT min(w.state) AS state FROM workflow_steps AS w"
        f" WHERE w.task_uuid = ids.task_uuid{after[i]}) AS s{i} ON true"
        for i in range(count)
    )
    states = ", ".join(f"s{i}.state" for i in range(count))
    return (
        f"SELECT ids.task_uuid, ARRAY[{states}] AS states"
        f" FROM unnest(:ids) AS ids(task_uuid) {firsts}"
    )


_DISTINCT_STATES = DirectStatement(
    text(_distinct_states_sql(len(STEP_STATES)))
    .bindparams(bindparam("ids", type_=ARRAY(String())))
    .columns(column("task_uuid", String()), column("states", ARRAY(String())))
)
_SET_TASK_STATE = BulkStatement(
    update(tasks)
    .where(tasks.c.task_uuid == bindparam("b_task_uuid"))
    .values(
        state=bindparam("v_state"),
        updated_at=bindparam("v_updated_at", type_=tasks.c.updated_at.type),
        completed_at=bindparam("v_completed_at", type_=tasks.c.completed_at.type),
    ),
    ("v_state", "v_updated_at", "v_completed_at", "b_task_uuid"),
)


def mark_tasks_started(conn: Connection, task_uuids: list[str], now: datetime) -> None:
    """Move still-pending tasks to in_progress, skipping task rows another writer holds.

    A skipped task stays ``pending`` only until its first result is committed, which brings
    the task state up to date (``derive_task_state``).
    """
    query = _START_FREE_TASKS if conn.dialect.name == "postgresql" else _START_TASKS
    query.rowcount(conn, {"ids": task_uuids, "now": now})


_STARTED = {
    "state": TASK_IN_PROGRESS,
    "updated_at": bindparam("now", type_=tasks.c.updated_at.type),
}
# ``unindexed``: the rows are found by key; without it SQLite may read every pending task
# through the (state, ...) indexes, and tasks waiting for a delayed start are all pending.
_START_TASKS = DirectStatement(
    update(tasks)
    .where(
        tasks.c.task_uuid.in_(bindparam("ids", expanding=True)),
        unindexed(tasks.c.state) == TASK_PENDING,
    )
    .values(_STARTED)
)
# One statement on PostgreSQL too: the subquery locks the rows, skipping those another writer
# holds, and the update only touches (and waits for) the rows it returned.
_free_task = tasks.alias("free_task")
_START_FREE_TASKS = DirectStatement(
    update(tasks)
    .where(
        tasks.c.task_uuid.in_(
            select(_free_task.c.task_uuid)
            .where(
                _free_task.c.task_uuid.in_(bindparam("ids", expanding=True)),
                unindexed(_free_task.c.state) == TASK_PENDING,
            )
            .with_for_update(skip_locked=True)
        )
    )
    .values(_STARTED)
)
