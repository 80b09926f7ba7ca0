"""Delayed starts in storage, on SQLite and PostgreSQL: a task's roots are not claimable before
its ``run_at``, whoever claims; a time already past means now; the claim reads none of the
steps still waiting for their time (the plans below show the index ranges it uses).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, select, text, update

from duplex.clock import utcnow
from duplex.storage.claim_order import due_levels_statement, ready_statement
from duplex.storage.claims import claim_ready_steps, claim_steps
from duplex.storage.dashboard_detail import steps_of_task, task_detail
from duplex.storage.dashboard_list import TaskFilter, status_counts, task_page
from duplex.storage.db import Database
from duplex.storage.models import workflow_step_transitions, workflow_steps
from duplex.storage.queries import get_task, ready_queue
from duplex.storage.submission import create_task, create_tasks
from duplex.templates import parse_template

ONE = parse_template('name = "one"\n[[steps]]\nname = "a"\nhandler = "t.a"\n')
CHAIN = parse_template(
    'name = "chain"\n[[steps]]\nname = "a"\nhandler = "t.a"\n'
    '[[steps]]\nname = "b"\nhandler = "t.b"\ndepends_on = ["a"]\n'
)


def claim(db: Database, now: datetime, limit: int = 10) -> list[str]:
    with db.write() as conn:
        steps = claim_ready_steps(
            conn, worker_id="w1", namespaces=("default",), limit=limit, now=now
        )
    return [step.task_uuid for step in steps]


def test_a_delayed_root_is_claimed_at_its_time_and_not_a_microsecond_before(
    db: Database,
) -> None:
    t0 = utcnow()
    run_at = t0 + timedelta(seconds=30)
    with db.write() as conn:
        task = create_task(conn, CHAIN, {}, now=t0, run_at=run_at)
        other = create_task(conn, ONE, {}, now=t0)

    assert claim(db, t0) == [other]
    assert claim(db, run_at - timedelta(microseconds=1)) == []
    with db.read() as conn:
        summary = get_task(conn, task)
    assert (summary.execution_status, summary.scheduled_for) == ("scheduled", run_at)

    assert claim(db, run_at) == [task]
    t = workflow_step_transitions
    with db.read() as conn:
        rows = conn.execute(
            select(t.c.to_state, t.c.reason, t.c.created_at)
            .join(workflow_steps, workflow_steps.c.step_uuid == t.c.step_uuid)
            .where(workflow_steps.c.task_uuid == task, workflow_steps.c.name == "a")
            .order_by(t.c.id)
        ).all()
    assert [(r.to_state, r.reason) for r in rows] == [
        ("enqueued", f"submitted; scheduled for {run_at.isoformat()}"),
        ("in_progress", "claimed"),
    ]
    assert rows[1].created_at >= run_at


def test_a_run_at_already_past_means_now(db: Database) -> None:
    t0 = utcnow() - timedelta(seconds=10)  # the view reads the database's clock
    with db.write() as conn:
        older = create_task(conn, ONE, {}, now=t0)
        late = create_task(
            conn, ONE, {}, now=t0 + timedelta(seconds=1), run_at=t0 - timedelta(days=1)
        )
    with db.read() as conn:
        at = conn.execute(
            select(workflow_steps.c.next_attempt_at).where(workflow_steps.c.task_uuid == late)
        ).scalar_one()
        status = get_task(conn, late).execution_status
    # Its place in the queue is its submission, not the past time it named.
    assert (at, status) == (t0 + timedelta(seconds=1), "has_ready_steps")
    assert claim(db, t0 + timedelta(seconds=2), limit=1) == [older]


def test_the_claim_itself_refuses_a_step_before_its_time(db: Database) -> None:
    """The guard every claim goes through (queue claims and a commit's eager claims alike)."""
    t0 = utcnow()
    with db.write() as conn:
        task = create_task(conn, ONE, {}, now=t0, run_at=t0 + timedelta(seconds=5))
        step = conn.execute(
            select(workflow_steps.c.step_uuid).where(workflow_steps.c.task_uuid == task)
        ).scalar_one()
    with db.write() as conn:
        early = claim_steps(conn, {step: "enqueued"}, worker_id="w1", now=t0)
    with db.write() as conn:
        on_time = claim_steps(
            conn, {step: "enqueued"}, worker_id="w1", now=t0 + timedelta(seconds=5)
        )
    assert (len(early), len(on_time)) == (0, 1)


def test_many_steps_waiting_for_their_time_are_never_read(db: Database) -> None:
    """The plans of both claim statements: index ranges bounded by ``now``, so with 3,000 steps
    scheduled and 5 due, the claim reads about 5 rows (PostgreSQL: actual rows counted)."""
    t0 = utcnow()
    with db.write() as conn:
        create_tasks(conn, ONE, [{}] * 3000, now=t0, run_at=t0 + timedelta(hours=1))
        create_tasks(conn, ONE, [{}] * 3000, now=t0, run_at=t0 + timedelta(hours=1), priority=9)
        create_tasks(conn, ONE, [{}] * 5, now=t0)
    with db.write() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("ANALYZE workflow_steps"))
            _assert_postgres_reads_only_due_rows(conn, t0)
        else:
            _assert_sqlite_searches_by_range(conn, t0)
    assert len(claim(db, t0 + timedelta(seconds=1))) == 5


_ANALYZE = "ANALYZE workflow_steps, tasks, pauses"


@pytest.mark.parametrize("analyzed", [False, True], ids=["no_statistics", "statistics"])
def test_finished_steps_are_never_read_by_a_claim(db: Database, analyzed: bool) -> None:
    """3,000 finished steps, all past their ``next_attempt_at``, and 5 due: the claim's reads
    are index probes of about 5 rows, on a table written moments ago (no statistics yet) as
    on one analyzed since. On PostgreSQL a level's "has a due step" spelled as EXISTS became
    a hash join over every step ready in the past, whatever its state (without statistics),
    and as an unordered LIMIT 1 a sequential scan expecting a match early (with them)."""
    t0 = utcnow()
    with db.write() as conn:
        create_tasks(conn, ONE, [{}] * 3000, now=t0 - timedelta(seconds=5))
        conn.execute(update(workflow_steps).values(state="complete"))
        create_tasks(conn, ONE, [{}] * 5, now=t0)
    with db.write() as conn:
        if analyzed:
            conn.execute(text("ANALYZE workflow_steps" if db.is_sqlite else _ANALYZE))
        if conn.dialect.name == "postgresql":
            _assert_postgres_reads_only_due_rows(conn, t0)
        else:
            _assert_sqlite_searches_by_range(conn, t0)
    assert len(claim(db, t0 + timedelta(seconds=1))) == 5


def _statements() -> list[tuple[Any, dict[str, Any]]]:
    levels = {"s0": "enqueued", "n0": "default", "p0": 0}
    return [
        (due_levels_statement(1, 16).statement, {"n0": "default"}),  # a claim's
        (due_levels_statement(1, 1).statement, {"n0": "default"}),  # an eager claim's
        (ready_statement(1, True).statement, {**levels, "limit": 10}),
    ]


_OWN_ROWS = re.compile(r"SCAN (CONSTANT ROW|pairs|levels|due|paused_tasks|l\d+)$")


def _assert_sqlite_searches_by_range(conn: Connection, now: datetime) -> None:
    for statement, params in _statements():
        compiled = statement.compile(dialect=conn.dialect)
        values = compiled.construct_params(
            {
                **params,
                "now": (text_now := now.replace(tzinfo=None).isoformat(sep=" ")),
                "c0": text_now,
            }
        )
        positional = [values[name] for name in compiled.positiontup or ()]
        plan = " | ".join(
            row[3]
            for row in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + compiled.string, tuple(positional)
            )
        )
        # Every read of a table is an index search; only the CTEs' and subqueries' own rows
        # are scanned (a table read as SCAN goes by its alias: ``SCAN w``).
        parts = plan.split(" | ")
        scans = [part for part in parts if part.startswith("SCAN") and not _OWN_ROWS.match(part)]
        assert not scans, plan
        assert any("USING" in part and "next_attempt_at<?" in part for part in parts), plan


def _assert_postgres_reads_only_due_rows(conn: Connection, now: datetime) -> None:
    for statement, params in _statements():
        compiled = statement.compile(dialect=conn.dialect)
        later = now + timedelta(seconds=1)
        values = compiled.construct_params({**params, "now": later, "c0": later})
        (plan,) = conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + compiled.string, values
        ).scalar_one()
        plan = plan if isinstance(plan, dict) else json.loads(plan)[0]
        nodes = list(_nodes(plan["Plan"]))
        scans = [n for n in nodes if "Scan" in n["Node Type"] and "Relation Name" in n]
        # A sequential scan of a table that grows with the work, run at all (``pauses`` is a
        # handful of rows; the paused templates' tasks are not read when none is paused).
        walked = [
            n
            for n in scans
            if n["Node Type"] == "Seq Scan"
            and n["Relation Name"] in ("workflow_steps", "tasks")
            and n["Actual Loops"]
        ]
        assert not walked, plan
        # Rows read from tables, and rows an index range held that the scan filtered out.
        read = sum(
            n["Actual Rows"] * n["Actual Loops"] + n.get("Rows Removed by Filter", 0) for n in scans
        )
        assert read <= 20, plan


def _nodes(node: dict[str, Any]) -> Any:
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)


@pytest.mark.parametrize("field", ["run_at", "priority"])
def test_submission_keeps_its_arguments_out_of_tasks_reused_by_idempotency_key(
    db: Database, field: str
) -> None:
    t0 = utcnow()
    later: dict[str, Any] = {"run_at": t0 + timedelta(hours=1), "priority": 50}
    again_with = {field: later[field]}
    with db.write() as conn:
        (first,) = create_tasks(conn, ONE, [{}], now=t0, idempotency_keys=["k"])
        (again,) = create_tasks(conn, ONE, [{}], now=t0, idempotency_keys=["k"], **again_with)
        row = conn.execute(select(workflow_steps).where(workflow_steps.c.task_uuid == first)).one()
    assert first == again
    assert (row.next_attempt_at, row.priority) == (t0, 0)


def test_the_dashboard_reads_show_a_scheduled_task_and_its_start(db: Database) -> None:
    t0 = utcnow()
    start = t0 + timedelta(hours=3)
    with db.write() as conn:
        task = create_task(conn, CHAIN, {}, now=t0, run_at=start)
        ready = create_task(conn, CHAIN, {}, now=t0)
    with db.read() as conn:
        page = task_page(conn, TaskFilter(), limit=10)
        detail = task_detail(conn, task)
        counts = status_counts(conn, TaskFilter())
        only = task_page(conn, TaskFilter(execution_status="scheduled"), limit=10)
    shown = {row.task_uuid: (row.execution_status, row.scheduled_for) for row in page.rows}
    assert shown == {task: ("scheduled", start), ready: ("has_ready_steps", None)}
    assert (detail.execution_status, detail.scheduled_for) == ("scheduled", start)
    assert (counts["scheduled"], counts["has_ready_steps"]) == (1, 1)
    assert [row.task_uuid for row in only.rows] == [task]
    with db.read() as conn:
        steps = steps_of_task(conn, ready)
    assert [(step.name, step.priority) for step in steps] == [("a", 0), ("b", 0)]


def test_the_ready_queue_figures_leave_out_steps_waiting_for_their_time(db: Database) -> None:
    t0 = utcnow() - timedelta(seconds=5)
    with db.write() as conn:
        create_tasks(conn, ONE, [{}] * 4, now=t0, run_at=t0 + timedelta(hours=1))
        create_tasks(conn, ONE, [{}] * 3, now=t0, priority=2)
        create_tasks(conn, ONE, [{}] * 2, now=t0)
    with db.read() as conn:
        ready, oldest = ready_queue(conn, ["default"], now=t0 + timedelta(seconds=5))
    assert ready == {"default": 5}
    assert oldest["default"] == pytest.approx(5.0)
