"""The dashboard's queries (``duplex.storage.dashboard_list``, ``dashboard_detail``) on SQLite
and PostgreSQL.

The pagination property walks every page of a random history, with created_at ties, and
checks that each task is shown exactly once, in order, and that "newer" walks back to the
same pages. The status counts are checked against the view itself.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select, update

from duplex.clock import utcnow
from duplex.storage.dashboard_detail import events_of_task, step_detail, steps_of_task, task_detail
from duplex.storage.dashboard_list import TaskFilter, status_counts, task_page
from duplex.storage.db import Database
from duplex.storage.models import tasks, workflow_steps
from duplex.storage.operations import resolve_step, retry_step
from duplex.storage.queries import execution_status, transitions_of_task
from tests.conftest import sqlite_database
from tests.storage.support import FAN_IN, Flow

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _insert_tasks(db: Database, namespace: str, rows: list[tuple[int, str, str]]) -> None:
    """Tasks without steps: (second offset, name, state) each."""
    if not rows:
        return
    with db.write() as conn:
        conn.execute(
            insert(tasks),
            [
                {
                    "task_uuid": str(uuid.uuid4()),
                    "name": name,
                    "namespace": namespace,
                    "version": "1",
                    "state": state,
                    "context": {},
                    "created_at": T0 + timedelta(seconds=offset),
                    "updated_at": T0,
                }
                for offset, name, state in rows
            ],
        )


def _walk(db: Database, flt: TaskFilter, size: int, most: int) -> list[list[str]]:
    """Every page from the newest, then back with the newer cursors (``most`` pages at most:
    a cursor that does not move on must fail the test, not loop)."""
    pages: list[list[str]] = []
    with db.read() as conn:
        page = task_page(conn, flt, limit=size)
        pages.append([r.task_uuid for r in page.rows])
        assert page.newer is None
        while page.older is not None:
            assert len(pages) <= most, "the older cursors do not move on"
            page = task_page(conn, flt, limit=size, before=page.older)
            pages.append([r.task_uuid for r in page.rows])
            assert page.rows, "an older cursor must lead to a page"
        # And back again with the newer cursors: the same pages, newest last.
        back = [pages[-1]]
        while page.newer is not None:
            assert len(back) <= most, "the newer cursors do not move on"
            page = task_page(conn, flt, limit=size, after=page.newer)
            back.append([r.task_uuid for r in page.rows])
        assert len(back) == len(pages)
        # Pages walked back may be cut differently only on the first page.
        assert [u for p in reversed(back) for u in p] == [u for p in pages for u in p]
    return pages


HISTORY = st.lists(
    st.tuples(
        st.integers(0, 5), st.sampled_from(["a", "b"]), st.sampled_from(["complete", "error"])
    ),
    max_size=40,
)


def _pagination_property(db: Database) -> None:
    @settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        HISTORY, st.integers(1, 7), st.sampled_from([None, "a"]), st.sampled_from([None, "error"])
    )
    def check(
        rows: list[tuple[int, str, str]], size: int, name: str | None, state: str | None
    ) -> None:
        namespace = f"ns-{uuid.uuid4().hex[:10]}"
        _insert_tasks(db, namespace, rows)
        flt = TaskFilter(namespace=namespace, name=name, state=state)
        with db.read() as conn:
            expected = [
                r.task_uuid
                for r in conn.execute(
                    select(tasks.c.task_uuid)
                    .where(tasks.c.namespace == namespace)
                    .where(*([tasks.c.name == name] if name else []))
                    .where(*([tasks.c.state == state] if state else []))
                    .order_by(tasks.c.created_at.desc(), tasks.c.task_uuid.desc())
                )
            ]
        pages = _walk(db, flt, size, most=len(expected) // size + 2)
        assert [u for p in pages for u in p] == expected
        assert all(len(p) <= size for p in pages)
        assert all(len(p) == size for p in pages[:-1])

    check()


def test_pages_show_every_task_once_in_order_sqlite(tmp_path: Path) -> None:
    db = sqlite_database(tmp_path / "d.db")
    try:
        _pagination_property(db)
    finally:
        db.dispose()


def test_pages_show_every_task_once_in_order_postgres(postgres_db: Database) -> None:
    _pagination_property(postgres_db)


def test_time_range_filters_created_at(db: Database) -> None:
    namespace = f"ns-{uuid.uuid4().hex[:10]}"
    _insert_tasks(db, namespace, [(0, "a", "complete"), (60, "a", "complete"), (120, "a", "error")])
    with db.read() as conn:
        page = task_page(
            conn,
            TaskFilter(
                namespace=namespace,
                since=T0 + timedelta(seconds=30),
                until=T0 + timedelta(seconds=120),
            ),
            limit=10,
        )
    assert [r.created_at for r in page.rows] == [T0 + timedelta(seconds=60)]


def test_status_counts_agree_with_the_view(db: Database) -> None:
    done = Flow(db, FAN_IN)
    for step in done.claim("p", "q"):
        done.run(step)
    done.run(done.claim("d")[0])
    failed = Flow(db, FAN_IN)
    p, _q = sorted(failed.claim("p", "q"), key=lambda s: s.name)
    failed.run(p, "permanent")
    running = Flow(db, FAN_IN)
    running.claim("p", "q")
    retry_due = Flow(db, FAN_IN)  # a retry due now (no backoff in POLICY) is ready
    p, _q = sorted(retry_due.claim("p", "q"), key=lambda s: s.name)
    retry_due.run(p, "retryable")
    retry_due.run(_q)
    waiting = Flow(db, FAN_IN)
    for step in waiting.claim("p", "q"):
        waiting.run(step, "permanent" if step.name == "p" else "success")
    with db.write() as conn:  # p resolved later would unblock d; here only d is left waiting
        resolve_step(conn, waiting.uuid_of("p"), operator="t", now=utcnow())
        conn.execute(
            update(workflow_steps)
            .where(workflow_steps.c.step_uuid == waiting.uuid_of("d"))
            .values(state="pending")
        )
    counts: dict[str, int] = {}
    flows = (done, failed, running, retry_due, waiting)
    with db.read() as conn:
        for flow in flows:
            status = conn.execute(
                select(execution_status.c.execution_status).where(
                    execution_status.c.task_uuid == flow.task
                )
            ).scalar_one()
            counts[status] = counts.get(status, 0) + 1
        for flow in flows:
            flt = TaskFilter(namespace=flow.namespace)
            mine = {k: v for k, v in status_counts(conn, flt).items() if v}
            assert sum(mine.values()) == 1
            status = conn.execute(
                select(execution_status.c.execution_status).where(
                    execution_status.c.task_uuid == flow.task
                )
            ).scalar_one()
            assert mine == {status: 1}
            (listed,) = task_page(conn, TaskFilter(namespace=flow.namespace), limit=5).rows
            assert listed.execution_status == status
            (filtered_one,) = task_page(
                conn, TaskFilter(namespace=flow.namespace, execution_status=status), limit=5
            ).rows
            assert filtered_one.task_uuid == flow.task
        found = task_page(conn, TaskFilter(namespace=failed.namespace), limit=5).rows
    assert counts == {
        "all_complete": 1,
        "blocked_by_failures": 1,
        "processing": 1,
        "has_ready_steps": 1,
        "waiting_for_dependencies": 1,
    }
    assert found[0].execution_status == "blocked_by_failures"
    assert (found[0].total_steps, found[0].error_steps, found[0].in_progress_steps) == (3, 1, 1)
    with db.read() as conn:
        only_done = status_counts(conn, TaskFilter(namespace=done.namespace))
        filtered = task_page(
            conn,
            TaskFilter(namespace=failed.namespace, execution_status="all_complete"),
            limit=5,
        ).rows
        blocked = task_page(
            conn,
            TaskFilter(namespace=failed.namespace, execution_status="blocked_by_failures"),
            limit=5,
        ).rows
    assert only_done["all_complete"] == 1
    assert filtered == []
    assert [r.task_uuid for r in blocked] == [failed.task]


def test_a_task_with_its_steps_transitions_and_events(db: Database) -> None:
    flow = Flow(db)
    a = flow.claim("a", "x")
    for step in a:
        flow.run(step, "permanent" if step.name == "x" else "success")
    (b,) = flow.claim("b")
    flow.run(b, "retryable")
    with db.read() as conn:
        task = task_detail(conn, flow.task)
        steps = {s.name: s for s in steps_of_task(conn, flow.task)}
        history = transitions_of_task(conn, flow.task)
        events, total = events_of_task(conn, flow.task)
        x_events, _ = events_of_task(conn, flow.task, step_uuid=steps["x"].step_uuid)
        b_step = step_detail(conn, steps["b"].step_uuid)
    assert task.context == {"k": 1}
    assert task.execution_status == "blocked_by_failures"
    assert steps["b"].parents == [steps["a"].step_uuid]
    assert steps["c"].parents == [steps["b"].step_uuid]
    assert b_step.parents == [steps["a"].step_uuid]
    assert b_step.state == "waiting_for_retry"
    assert steps["x"].error["error_type"] == "permanent_error"
    assert [e.sequence for e in events] == list(range(1, total + 1))
    assert {e.name for e in x_events} == {"step.failed"}
    b_moves = [(t.from_state, t.to_state) for t in history if t.step_uuid == b_step.step_uuid]
    assert b_moves == [
        (None, "pending"),
        ("pending", "enqueued"),
        ("enqueued", "in_progress"),
        ("in_progress", "waiting_for_retry"),
    ]


def test_operator_changes_show_in_the_history(db: Database) -> None:
    flow = Flow(db)
    for step in flow.claim("a", "x"):
        flow.run(step, "permanent" if step.name == "x" else "success")
    x = flow.uuid_of("x")
    with db.write() as conn:
        retry_step(conn, x, operator="operator:ada (dashboard)", now=utcnow(), reason="flaky")
    with db.write() as conn:
        conn.execute(update(tasks).where(tasks.c.task_uuid == flow.task).values(name="ops"))
        resolve_step(conn, x, operator="operator:ada (dashboard)", now=utcnow(), reason=None)
    with db.read() as conn:
        rows = [t for t in transitions_of_task(conn, flow.task) if t.step_uuid == x]
    assert [(t.to_state, t.worker_id) for t in rows[-2:]] == [
        ("enqueued", "operator:ada (dashboard)"),
        ("resolved_manually", "operator:ada (dashboard)"),
    ]
    assert rows[-2].reason == "retried by operator: flaky"


def test_a_cancelled_task_is_counted_and_filtered_as_cancelled(db: Database) -> None:
    from duplex.storage.operations import cancel_task

    flow = Flow(db, FAN_IN)
    flow.claim("p", "q")  # both still running when the task is cancelled; d never runs
    with db.write() as conn:
        cancel_task(conn, flow.task, operator="t", now=utcnow())
    flt = TaskFilter(namespace=flow.namespace)
    with db.read() as conn:
        view = conn.execute(
            select(execution_status.c.execution_status).where(
                execution_status.c.task_uuid == flow.task
            )
        ).scalar_one()
        counts = {k: v for k, v in status_counts(conn, flt).items() if v}
        (listed,) = task_page(conn, flt, limit=5).rows
        (found,) = task_page(
            conn, TaskFilter(namespace=flow.namespace, execution_status="cancelled"), limit=5
        ).rows
        waiting = task_page(
            conn,
            TaskFilter(namespace=flow.namespace, execution_status="waiting_for_dependencies"),
            limit=5,
        ).rows
        detail = task_detail(conn, flow.task)
    assert view == "cancelled"
    assert counts == {"cancelled": 1}
    assert listed.execution_status == "cancelled"
    assert found.task_uuid == flow.task
    assert waiting == []
    assert detail.execution_status == "cancelled"
