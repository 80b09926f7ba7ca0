"""The deadline sweep (``duplex.storage.deadlines``) on SQLite and PostgreSQL, at fixed times.

A task of three steps: ``first`` claimed (running), ``retried`` failed once and waits for its
retry, ``last`` pending on ``first``; and a task with no deadline beside it. At the deadline
the sweep cancels exactly the waiting steps, writes their transitions with the reason, leaves
the running attempt to its worker, cancels the task and announces it once.
"""

from __future__ import annotations

import random
import threading
import uuid
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from duplex.commit.retry import RetryPolicy
from duplex.errors import TASK_DEADLINE_EXCEEDED
from duplex.messages import StepFailure, StepOutcome
from duplex.states import TASK_CANCELLED
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.deadlines import expire_tasks, find_expired_tasks
from duplex.storage.models import domain_events, tasks, workflow_step_transitions, workflow_steps
from duplex.storage.results import commit_outcomes
from duplex.storage.submission import create_task
from duplex.templates import parse_template

T0 = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)
DEADLINE = T0 + timedelta(minutes=15)
POLICY = RetryPolicy(base_ms=600_000, multiplier=1.0, max_ms=600_000, jitter=0.0)
POLICY_NOW = RetryPolicy(base_ms=0, multiplier=1.0, max_ms=0, jitter=0.0)
BOOM = StepFailure("handler_error", "boom", retryable=True)

TEMPLATE = """
name = "{name}"
namespace = "{name}"
max_duration = "15m"
[[steps]]
name = "first"
handler = "t.h"
[[steps]]
name = "retried"
handler = "t.h"
[[steps]]
name = "last"
handler = "t.h"
depends_on = ["first"]
"""


def states(db: Database, task: str) -> dict[str, str]:
    with db.read() as conn:
        rows = conn.execute(
            select(workflow_steps.c.name, workflow_steps.c.state).where(
                workflow_steps.c.task_uuid == task
            )
        )
        return dict(rows.all())


def task_row(db: Database, task: str) -> object:
    with db.read() as conn:
        return conn.execute(select(tasks).where(tasks.c.task_uuid == task)).one()


def setup_task(db: Database, name: str = "dl") -> str:
    """Submit at T0; claim ``first`` and ``retried``; fail ``retried`` once (retry in 10 min)."""
    template = parse_template(TEMPLATE.format(name=name))
    with db.write() as conn:
        task = create_task(conn, template, {}, now=T0)
    with db.write() as conn:
        claimed = claim_ready_steps(
            conn, worker_id="w1", namespaces=[name], limit=5, now=T0 + timedelta(seconds=1)
        )
    assert {c.name for c in claimed} == {"first", "retried"}
    assert all(c.deadline_at == DEADLINE for c in claimed)  # the claim carries it
    retried = next(c for c in claimed if c.name == "retried")
    failure = StepFailure("handler_error", "boom", retryable=True)
    at = T0 + timedelta(seconds=2)
    with db.write() as conn:
        commit_outcomes(
            conn,
            [StepOutcome(retried, at, at, failure=failure)],
            policy=POLICY,
            now=at,
            rng=random.Random(0),
        )
    return task


def sweep(db: Database, now: datetime) -> list[str]:
    with db.read() as conn:
        found = find_expired_tasks(conn, now=now)
    if not found:
        return []
    with db.write() as conn:
        report = expire_tasks(conn, found, now=now, worker_id="sweeper")
    return [t.task_uuid for t in report.expired]


def test_the_deadline_is_submission_time_plus_max_duration(db: Database) -> None:
    task = setup_task(db)
    assert task_row(db, task).deadline_at == DEADLINE  # type: ignore[attr-defined]


def test_a_delayed_task_s_deadline_counts_from_its_start(db: Database) -> None:
    # Submitted at T0 to start an hour later: it gets its whole max_duration once it may run,
    # and the sweep leaves it alone until then.
    template = parse_template(TEMPLATE.format(name="later"))
    start = T0 + timedelta(hours=1)
    with db.write() as conn:
        task = create_task(conn, template, {}, now=T0, run_at=start)
    assert task_row(db, task).deadline_at == start + (DEADLINE - T0)  # type: ignore[attr-defined]
    assert sweep(db, DEADLINE + timedelta(minutes=1)) == []


def test_nothing_is_swept_before_the_deadline(db: Database) -> None:
    task = setup_task(db)
    assert sweep(db, DEADLINE - timedelta(microseconds=1)) == []
    assert states(db, task) == {
        "first": "in_progress",
        "retried": "waiting_for_retry",
        "last": "pending",
    }


def test_at_the_deadline_waiting_steps_are_cancelled_with_the_reason(db: Database) -> None:
    task = setup_task(db)
    with db.write() as conn:
        other = create_task(
            conn,
            parse_template(TEMPLATE.format(name="nodl").replace('max_duration = "15m"\n', "")),
            {},
            now=T0,
        )
    assert sweep(db, DEADLINE) == [task]
    assert states(db, task) == {"first": "in_progress", "retried": "cancelled", "last": "cancelled"}
    assert states(db, other) == {"first": "enqueued", "retried": "enqueued", "last": "pending"}
    row = task_row(db, task)
    assert row.state == TASK_CANCELLED  # type: ignore[attr-defined]
    assert row.completed_at == DEADLINE  # type: ignore[attr-defined]

    with db.read() as conn:
        steps = {
            r.name: r
            for r in conn.execute(select(workflow_steps).where(workflow_steps.c.task_uuid == task))
        }
        moves = conn.execute(
            select(
                workflow_step_transitions.c.step_uuid,
                workflow_step_transitions.c.from_state,
                workflow_step_transitions.c.to_state,
                workflow_step_transitions.c.worker_id,
                workflow_step_transitions.c.reason,
                workflow_step_transitions.c.created_at,
            ).where(workflow_step_transitions.c.to_state == "cancelled")
        ).all()
        events = conn.execute(
            select(domain_events.c.name, domain_events.c.payload, domain_events.c.sequence)
            .where(domain_events.c.task_uuid == task)
            .order_by(domain_events.c.sequence)
        ).all()
    by_step = {m.step_uuid: m for m in moves}
    for name, from_state in (("retried", "waiting_for_retry"), ("last", "pending")):
        step = steps[name]
        move = by_step[step.step_uuid]
        assert move.from_state == from_state
        assert move.worker_id == "sweeper"
        assert move.reason.startswith(f"{TASK_DEADLINE_EXCEEDED}: ")
        assert DEADLINE.isoformat() in move.reason
        assert move.created_at == DEADLINE
        assert step.error["error_type"] == TASK_DEADLINE_EXCEEDED
        assert step.next_attempt_at is None
    assert steps["retried"].error["previous"]["error_type"] == "handler_error"
    assert len(moves) == 2
    assert [e.name for e in events] == ["step.failed", "task.deadline_exceeded"]
    assert events[1].sequence == events[0].sequence + 1
    assert events[1].payload["cancelled_steps"] == ["retried", "last"]
    assert events[1].payload["running_steps"] == 1


def test_a_task_is_expired_once(db: Database) -> None:
    task = setup_task(db)
    assert sweep(db, DEADLINE) == [task]
    assert sweep(db, DEADLINE + timedelta(hours=1)) == []
    with db.write() as conn:  # asked again directly (a racing sweeper that read it before)
        assert expire_tasks(conn, [task], now=DEADLINE, worker_id="late").expired == []


def test_a_task_finished_before_its_deadline_is_untouched(db: Database) -> None:
    template = parse_template(
        'name = "quick"\nnamespace = "quick"\nmax_duration = "1s"\n'
        '[[steps]]\nname = "only"\nhandler = "t.h"\n'
    )
    with db.write() as conn:
        task = create_task(conn, template, {}, now=T0)
    with db.write() as conn:
        (step,) = claim_ready_steps(conn, worker_id="w1", namespaces=["quick"], limit=1, now=T0)
    done = T0 + timedelta(milliseconds=500)
    with db.write() as conn:
        commit_outcomes(
            conn,
            [StepOutcome(step, T0, done, result={})],
            policy=POLICY,
            now=done,
            rng=random.Random(0),
        )
    assert sweep(db, T0 + timedelta(hours=1)) == []
    assert states(db, task) == {"only": "complete"}
    assert task_row(db, task).state == "complete"  # type: ignore[attr-defined]


def test_a_running_deadline_failure_settles_the_task_state_first(db: Database) -> None:
    # The running attempt's failure commits the task to ``error`` (nothing else can run); the
    # expiry in the same transaction still cancels the waiting steps and the task.
    template = parse_template(
        'name = "two"\nnamespace = "two"\nmax_duration = "2s"\n'
        '[[steps]]\nname = "a"\nhandler = "t.h"\n'
        '[[steps]]\nname = "b"\nhandler = "t.h"\ndepends_on = ["a"]\n'
    )
    with db.write() as conn:
        task = create_task(conn, template, {}, now=T0)
    with db.write() as conn:
        (step,) = claim_ready_steps(conn, worker_id="w1", namespaces=["two"], limit=1, now=T0)
    at = T0 + timedelta(seconds=2)
    failure = StepFailure(TASK_DEADLINE_EXCEEDED, "deadline", retryable=False)
    with db.write() as conn:
        commit_outcomes(
            conn,
            [StepOutcome(step, T0, at, failure=failure)],
            policy=POLICY,
            now=at,
            rng=random.Random(0),
        )
        assert task_row_in(conn, task) == "error"
        report = expire_tasks(conn, [task], now=at, worker_id="w1")
    assert [t.cancelled_steps for t in report.expired] == [("b",)]
    assert states(db, task) == {"a": "error", "b": "cancelled"}
    assert task_row(db, task).state == TASK_CANCELLED  # type: ignore[attr-defined]


def task_row_in(conn: object, task: str) -> str:
    return str(conn.execute(select(tasks.c.state).where(tasks.c.task_uuid == task)).scalar_one())  # type: ignore[attr-defined]


@pytest.mark.parametrize("limit", [1, 3])
def test_the_sweep_takes_the_earliest_deadlines_first(db: Database, limit: int) -> None:
    made = []
    for minutes in (30, 10, 20):
        template = parse_template(
            f'name = "m{minutes}"\nmax_duration = "{minutes}m"\n'
            '[[steps]]\nname = "a"\nhandler = "t.h"\n'
        )
        with db.write() as conn:
            made.append(create_task(conn, template, {}, now=T0))
    with db.read() as conn:
        found = find_expired_tasks(conn, now=T0 + timedelta(hours=1), limit=limit)
    assert found == [made[1], made[2], made[0]][:limit]


# --- racing sweepers, claimers and committers ---------------------------------------------

RACE_TEMPLATE = """
name = "race"
namespace = "{namespace}"
[[steps]]
name = "a"
handler = "t.h"
[[steps]]
name = "b"
handler = "t.h"
[[steps]]
name = "c"
handler = "t.h"
depends_on = ["a"]
"""
RACE_NOW = T0 + timedelta(hours=1)
RACE_WAIT_S = 60.0


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    offsets_s=st.lists(st.integers(min_value=-3, max_value=3), min_size=1, max_size=4),
    sweepers=st.integers(min_value=2, max_value=3),
    fail_first=st.booleans(),
)
def test_racing_sweepers_and_claimers_expire_each_task_exactly_once(
    db: Database, offsets_s: list[int], sweepers: int, fail_first: bool
) -> None:
    """Sweepers, a claimer and a committer race; every task past its deadline is expired once
    (unless the claimer finished it first), its steps' histories stay unbroken, and no task
    before its deadline is touched."""
    namespace = f"race-{uuid.uuid4().hex[:8]}"
    template = parse_template(RACE_TEMPLATE.format(namespace=namespace))
    submitted = RACE_NOW - timedelta(seconds=10)
    made: dict[str, bool] = {}  # task -> past its deadline at RACE_NOW
    with db.write() as conn:
        for offset in offsets_s:
            task = create_task(
                conn, template, {}, now=submitted, max_duration=timedelta(seconds=10 + offset)
            )
            made[task] = offset <= 0
    barrier = threading.Barrier(sweepers + 1)
    errors: list[BaseException] = []

    def sweeper(index: int) -> None:
        try:
            barrier.wait(RACE_WAIT_S)
            for _ in range(3):
                with db.read() as conn:
                    due = find_expired_tasks(conn, now=RACE_NOW)
                if due:
                    with db.write() as conn:
                        expire_tasks(conn, due, now=RACE_NOW, worker_id=f"s{index}")
        except BaseException as exc:
            errors.append(exc)

    def claimer() -> None:
        # Claims and commits as a worker would: a failure (retried at once, POLICY_NOW) or a
        # success, which makes ``c`` ready.
        try:
            barrier.wait(RACE_WAIT_S)
            for _ in range(6):
                with db.write() as conn:
                    got = claim_ready_steps(
                        conn, worker_id="w", namespaces=[namespace], limit=2, now=RACE_NOW
                    )
                if not got:
                    continue
                outcomes = [
                    StepOutcome(s, RACE_NOW, RACE_NOW, failure=BOOM)
                    if fail_first and s.attempt == 1
                    else StepOutcome(s, RACE_NOW, RACE_NOW, result={})
                    for s in got
                ]
                with db.write() as conn:
                    commit_outcomes(
                        conn, outcomes, policy=POLICY_NOW, now=RACE_NOW, rng=random.Random(0)
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sweeper, args=(i,)) for i in range(sweepers)]
    threads.append(threading.Thread(target=claimer))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(RACE_WAIT_S)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    # A last sweep: whatever the race left waiting in an expired task is cancelled now.
    sweep(db, RACE_NOW)

    with db.read() as conn:
        for task, past in made.items():
            announced = conn.execute(
                select(domain_events.c.name).where(
                    domain_events.c.task_uuid == task,
                    domain_events.c.name == "task.deadline_exceeded",
                )
            ).all()
            state = conn.execute(
                select(tasks.c.state).where(tasks.c.task_uuid == task)
            ).scalar_one()
            rows = conn.execute(
                select(workflow_steps.c.step_uuid, workflow_steps.c.state).where(
                    workflow_steps.c.task_uuid == task
                )
            ).all()
            if past:
                # Expired once, or finished by the claimer's commits before any sweep came
                # (results committed after the deadline still count): never both, never twice.
                assert state in (TASK_CANCELLED, "complete"), (task, state)
                assert len(announced) == (1 if state == TASK_CANCELLED else 0), task
                assert not {r.state for r in rows} & {"pending", "enqueued", "waiting_for_retry"}
            else:
                assert announced == []
                assert state != TASK_CANCELLED
                assert "cancelled" not in {r.state for r in rows}
            for row in rows:
                history = conn.execute(
                    select(
                        workflow_step_transitions.c.from_state,
                        workflow_step_transitions.c.to_state,
                    )
                    .where(workflow_step_transitions.c.step_uuid == row.step_uuid)
                    .order_by(workflow_step_transitions.c.id)
                ).all()
                # Unbroken: each move starts where the one before it ended, and ends where the
                # step is now; a step is cancelled at most once.
                for before, after in pairwise(history):
                    assert after.from_state == before.to_state, history
                assert history[-1].to_state == row.state
                assert sum(h.to_state == "cancelled" for h in history) <= 1
