"""The ``task_execution_status`` view, and the task-state rules, on the state mixes that
parallel execution creates.

Steps are put straight into the states under test with SQL, so each case is exactly the mix it
names; the view is then read through ``duplex.storage.queries`` as ``duplex status`` reads it.
Every case runs on SQLite and PostgreSQL (the view computes "now" differently on each).
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, insert, select, update

from duplex.clock import utcnow
from duplex.states import (
    COMPLETE,
    ERROR,
    STEP_STATES,
    TASK_CANCELLED,
    TASK_COMPLETE,
    TASK_ERROR,
    TASK_IN_PROGRESS,
    TASK_PENDING,
    derive_task_state,
)
from duplex.storage.db import Database
from duplex.storage.models import tasks, workflow_steps
from duplex.storage.queries import execution_status, get_task, list_tasks
from duplex.storage.submission import create_task
from duplex.storage.task_state import update_task_states
from duplex.templates import parse_template

# A step "state" of a case: a real step state, or a retry that is due / not yet due.
RETRY_DUE = "retry_due"
RETRY_LATER = "retry_later"


def make_task(db: Database, spec: list[str]) -> str:
    """Create a task with one independent step per entry of ``spec``, in those states."""
    now = utcnow()
    with db.write() as conn:
        if not spec:
            return create_empty_task(conn, now)
        lines = ['name = "mix"']
        for i in range(len(spec)):
            lines += ["[[steps]]", f'name = "s{i}"', 'handler = "t.noop"']
        task_uuid = create_task(conn, parse_template("\n".join(lines)), {}, now=now)
        for i, state in enumerate(spec):
            values: dict[str, Any] = {"state": state, "next_attempt_at": None}
            if state == RETRY_DUE:
                values = {"state": "waiting_for_retry", "next_attempt_at": now - timedelta(hours=1)}
            elif state == RETRY_LATER:
                values = {"state": "waiting_for_retry", "next_attempt_at": now + timedelta(hours=1)}
            elif state == "enqueued":
                values["next_attempt_at"] = now
            conn.execute(
                update(workflow_steps)
                .where(workflow_steps.c.task_uuid == task_uuid, workflow_steps.c.name == f"s{i}")
                .values(**values)
            )
    return task_uuid


def create_empty_task(conn: Connection, now: datetime) -> str:
    """Insert a task with no steps (no template can make one)."""
    task_uuid = str(uuid.uuid4())
    conn.execute(
        insert(tasks).values(
            task_uuid=task_uuid,
            name="empty",
            namespace="default",
            version="1.0.0",
            state=TASK_PENDING,
            context={},
            created_at=now,
            updated_at=now,
        )
    )
    return task_uuid


def view_row(db: Database, task_uuid: str) -> dict[str, Any]:
    with db.read() as conn:
        row = conn.execute(
            select(execution_status).where(execution_status.c.task_uuid == task_uuid)
        ).one()
    return dict(row._mapping)


def reference_status(spec: list[str]) -> tuple[str, int]:
    """docs/architecture.md, Task execution status, written out plainly.

    Returns (execution_status, ready_steps).
    """
    ready = sum(1 for s in spec if s in ("enqueued", RETRY_DUE))
    # A step cancelled in a task that goes on was cancelled on its own (``duplex cancel
    # --step``, migration 0015): its dependents cannot run, as after an error.
    if "error" in spec or "cancelled" in spec:
        return "blocked_by_failures", ready
    if ready:
        return "has_ready_steps", ready
    if "in_progress" in spec:
        return "processing", ready
    # A skipped step counts as done; a waiting one is neither ready nor blocking.
    if spec and all(s in ("complete", "resolved_manually", "skipped") for s in spec):
        return "all_complete", ready
    return "waiting_for_dependencies", ready


CASES = [
    # The mixes parallel execution creates, named as in the issue.
    pytest.param(["error", RETRY_DUE], "blocked_by_failures", 1, id="error+retry-due"),
    pytest.param(["error", "enqueued"], "blocked_by_failures", 1, id="error+enqueued"),
    pytest.param(["complete", "in_progress"], "processing", 0, id="complete+in-progress"),
    pytest.param(
        [RETRY_LATER, "complete"], "waiting_for_dependencies", 0, id="retry-not-due+complete"
    ),
    pytest.param(["resolved_manually"] * 3, "all_complete", 0, id="all-resolved"),
    pytest.param(["skipped", "complete"], "all_complete", 0, id="skipped-counts-as-done"),
    pytest.param(["waiting", "complete"], "waiting_for_dependencies", 0, id="waiting"),
    pytest.param([], "waiting_for_dependencies", 0, id="empty"),
    # Neighbours that pin the precedence down.
    pytest.param([RETRY_DUE, "complete"], "has_ready_steps", 1, id="retry-due+complete"),
    pytest.param([RETRY_DUE, "in_progress"], "has_ready_steps", 1, id="ready-beats-processing"),
    pytest.param(["error", "in_progress"], "blocked_by_failures", 0, id="error+in-progress"),
    pytest.param(
        [RETRY_LATER, RETRY_DUE, "enqueued", "pending"],
        "has_ready_steps",
        2,
        id="only-due-retries-count",
    ),
    pytest.param(["complete", "resolved_manually"], "all_complete", 0, id="complete+resolved"),
    pytest.param(["complete", "pending"], "waiting_for_dependencies", 0, id="complete+pending"),
    pytest.param(["complete", "cancelled"], "blocked_by_failures", 0, id="cancelled-step-blocks"),
    pytest.param([RETRY_LATER, "in_progress"], "processing", 0, id="retry-not-due+in-progress"),
]


@pytest.mark.parametrize(("spec", "expected", "ready"), CASES)
def test_execution_status_of_state_mixes(
    db: Database, spec: list[str], expected: str, ready: int
) -> None:
    task_uuid = make_task(db, spec)
    row = view_row(db, task_uuid)
    assert row["execution_status"] == expected
    assert row["ready_steps"] == ready
    assert (expected, ready) == reference_status(spec)
    states = Counter("waiting_for_retry" if s in (RETRY_DUE, RETRY_LATER) else s for s in spec)
    assert row["total_steps"] == len(spec)
    assert row["pending_steps"] == states["pending"]
    assert row["in_progress_steps"] == states["in_progress"]
    assert row["waiting_for_retry_steps"] == states["waiting_for_retry"]
    assert row["complete_steps"] == states["complete"]
    assert row["resolved_steps"] == states["resolved_manually"]
    assert row["error_steps"] == states["error"]
    assert row["cancelled_steps"] == states["cancelled"]
    # `duplex status` shows the same thing.
    with db.read() as conn:
        assert get_task(conn, task_uuid).execution_status == expected
        listed = {t.task_uuid: t.execution_status for t in list_tasks(conn)}
    assert listed[task_uuid] == expected


MIX = st.lists(
    st.sampled_from(
        [s for s in STEP_STATES if s != "waiting_for_retry"] + [RETRY_DUE, RETRY_LATER]
    ),
    max_size=8,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(spec=MIX)
def test_execution_status_matches_the_design_for_any_mix(
    sqlite_db: Database, spec: list[str]
) -> None:
    row = view_row(sqlite_db, make_task(sqlite_db, spec))
    assert (row["execution_status"], row["ready_steps"]) == reference_status(spec)


# --- task state (duplex.states.derive_task_state) --------------------------------------------


@pytest.mark.parametrize(
    ("current", "counts", "expected"),
    [
        pytest.param(TASK_PENDING, {"enqueued": 2}, TASK_PENDING, id="submitted"),
        pytest.param(TASK_PENDING, {"in_progress": 1, "pending": 1}, TASK_IN_PROGRESS, id="run"),
        pytest.param(TASK_IN_PROGRESS, {"complete": 2, "resolved_manually": 1}, TASK_COMPLETE),
        pytest.param(TASK_IN_PROGRESS, {"error": 1, "pending": 3}, TASK_ERROR, id="blocked"),
        pytest.param(
            TASK_IN_PROGRESS, {"cancelled": 1, "pending": 1}, TASK_ERROR, id="step-cancelled"
        ),
        pytest.param(
            TASK_IN_PROGRESS, {"error": 1, "in_progress": 1}, TASK_IN_PROGRESS, id="sibling-runs"
        ),
        pytest.param(
            TASK_IN_PROGRESS,
            {"error": 1, "waiting_for_retry": 1},
            TASK_IN_PROGRESS,
            id="sibling-retries",
        ),
        pytest.param(TASK_IN_PROGRESS, {"error": 1, "enqueued": 1}, TASK_IN_PROGRESS),
        pytest.param(TASK_ERROR, {"enqueued": 1, "complete": 1}, TASK_IN_PROGRESS, id="retried"),
        pytest.param(TASK_ERROR, {"resolved_manually": 1, "complete": 1}, TASK_COMPLETE),
        pytest.param(TASK_CANCELLED, {"complete": 3}, TASK_CANCELLED, id="cancel-sticks"),
        pytest.param(TASK_CANCELLED, {"error": 1}, TASK_CANCELLED),
    ],
)
def test_task_state_rules(current: str, counts: dict[str, int], expected: str) -> None:
    assert derive_task_state(current, counts) == expected


def test_task_state_is_stored_by_commits(sqlite_db: Database) -> None:
    """A task whose steps are all done reads complete; one blocked by an error reads error."""
    done = make_task(sqlite_db, [COMPLETE, "resolved_manually"])
    blocked = make_task(sqlite_db, [ERROR, "pending", COMPLETE])
    with sqlite_db.write() as conn:
        update_task_states(conn, [done, blocked], now=utcnow())
    with sqlite_db.read() as conn:
        states = dict(conn.execute(select(tasks.c.task_uuid, tasks.c.state)).all())
        finished = dict(conn.execute(select(tasks.c.task_uuid, tasks.c.completed_at)).all())
    assert states[done] == TASK_COMPLETE
    assert states[blocked] == TASK_ERROR
    assert finished[done] is not None
    assert finished[blocked] is not None


# --- a cancelled task ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(["cancelled", "cancelled"], id="all-cancelled"),
        pytest.param(["complete", "cancelled"], id="complete+cancelled"),
        pytest.param(["in_progress", "cancelled"], id="still-running"),
        pytest.param(["error", "cancelled"], id="failed-before-the-cancel"),
        pytest.param([RETRY_DUE, "complete"], id="ready-rows-do-not-matter"),
    ],
)
def test_a_cancelled_task_reads_cancelled_whatever_its_steps(db: Database, spec: list[str]) -> None:
    """Cancelled comes first: a cancelled task never runs again, so no other status fits."""
    task_uuid = make_task(db, spec)
    with db.write() as conn:
        conn.execute(
            update(tasks).where(tasks.c.task_uuid == task_uuid).values(state=TASK_CANCELLED)
        )
    assert view_row(db, task_uuid)["execution_status"] == "cancelled"
    with db.read() as conn:
        assert get_task(conn, task_uuid).execution_status == "cancelled"
        assert {t.task_uuid: t.execution_status for t in list_tasks(conn)}[task_uuid] == (
            "cancelled"
        )
