"""Cancelling what runs (``duplex.storage.cancels``) on SQLite and PostgreSQL, without actors:
the read each worker's sweep makes, ``duplex cancel --step`` on each state of a step, and the
commit of an attempt cancelled while it ran.
"""

from __future__ import annotations

import random

import pytest
from sqlalchemy import select

from duplex.clock import utcnow
from duplex.errors import TransitionError
from duplex.messages import ClaimedStep, StepFailure, StepOutcome
from duplex.storage.cancels import RunningCancel, cancel_step, find_cancelled_attempts
from duplex.storage.db import Database
from duplex.storage.operations import cancel_task, retry_step
from duplex.storage.queries import execution_status
from duplex.storage.results import commit_outcomes
from tests.storage.support import POLICY, Flow


def refused(flow: Flow, step_uuid: str, *fragments: str) -> None:
    """Assert that ``cancel_step`` refuses with one line naming ``fragments``, writing nothing."""
    before = (flow.states(), flow.task_row().state)
    with pytest.raises(TransitionError) as caught:
        flow.operate(cancel_step, step_uuid)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert (flow.states(), flow.task_row().state) == before


def swept(flow: Flow, me: str = "w1") -> list[RunningCancel]:
    with flow.db.read() as conn:
        return find_cancelled_attempts(conn, me=me)


def cancelled_while_running(flow: Flow, step: ClaimedStep, *, retryable: bool = True) -> None:
    """Commit what the Dispatcher commits for an attempt it cancelled."""
    now = utcnow()
    failure = StepFailure("cancelled", "cancelled by operator", retryable=retryable)
    outcome = StepOutcome(step, now, now, failure=failure)
    with flow.db.write() as conn:
        report = commit_outcomes(conn, [outcome], policy=POLICY, now=now, rng=random.Random(0))
    assert report.next_retry_at is None


def status_of(flow: Flow) -> str:
    with flow.db.read() as conn:
        return str(
            conn.execute(
                select(execution_status.c.execution_status).where(
                    execution_status.c.task_uuid == flow.task
                )
            ).scalar_one()
        )


def test_the_sweep_finds_only_its_own_running_attempts_of_cancelled_work(db: Database) -> None:
    flow, other = Flow(db), Flow(db)
    a, x = sorted(flow.claim("a", "x"), key=lambda s: s.name)
    other.claim("a", "x")  # running too, in a task nobody cancels
    assert swept(flow) == []

    report = flow.operate(cancel_task, flow.task)
    assert report.still_running == 2
    assert "2 running attempt(s) asked to stop" in report.summary
    assert sorted(swept(flow), key=lambda r: r.step_uuid) == sorted(
        [RunningCancel(a.step_uuid, 1, False), RunningCancel(x.step_uuid, 1, False)],
        key=lambda r: r.step_uuid,
    )
    assert swept(flow, me="w2") == []  # another worker's sweep leaves them to w1

    # Once the attempt's outcome is committed, the sweep no longer finds it.
    cancelled_while_running(flow, a)
    assert swept(flow) == [RunningCancel(x.step_uuid, 1, False)]


def test_cancel_step_of_a_running_step_asks_its_worker_and_the_commit_ends_it(
    db: Database,
) -> None:
    flow = Flow(db)
    a, _x = sorted(flow.claim("a", "x"), key=lambda s: s.name)
    report = flow.operate(cancel_step, a.step_uuid, "wrong order")
    assert report.still_running == 1
    assert report.changes == ()
    assert "is running: its attempt was asked to stop" in report.summary
    assert flow.step("a").state == "in_progress"  # only its worker ends it
    first = flow.step("a").cancel_requested_at
    assert first is not None
    flow.operate(cancel_step, a.step_uuid)  # again: the first request stands
    assert flow.step("a").cancel_requested_at == first
    assert swept(flow) == [RunningCancel(a.step_uuid, 1, True)]

    # The Dispatcher's failure: even marked retryable, it is not retried.
    cancelled_while_running(flow, a, retryable=True)
    row = flow.step("a")
    assert (row.state, row.error["error_type"], row.next_attempt_at) == (
        "cancelled",
        "cancelled",
        None,
    )
    (*_, last) = flow.transitions("a")
    assert (last.from_state, last.to_state) == ("in_progress", "cancelled")
    assert swept(flow) == []
    # b and c depend on a: the task is blocked, not cancelled, while x still runs.
    assert flow.task_row().state == "in_progress"
    assert status_of(flow) == "blocked_by_failures"


def test_cancel_step_before_it_runs_blocks_its_dependents_and_retry_brings_it_back(
    db: Database,
) -> None:
    flow = Flow(db)
    a, x = sorted(flow.claim("a", "x"), key=lambda s: s.name)
    report = flow.operate(cancel_step, flow.uuid_of("b"), "not needed")
    assert report.changes[0].from_state == "pending"
    assert report.summary.startswith("step 'b' (")
    row = flow.step("b")
    assert (row.state, row.error["error_type"], row.error["retryable"]) == (
        "cancelled",
        "cancelled",
        False,
    )
    assert "not needed" in row.error["message"]
    assert flow.transitions("b")[-1].reason == "cancelled by operator: not needed"

    flow.run(a)  # b is cancelled: nothing is enqueued after a
    flow.run(x)
    assert flow.states() == {"a": "complete", "b": "cancelled", "c": "pending", "x": "complete"}
    assert flow.task_row().state == "error"  # nothing else can run

    report = flow.operate(retry_step, flow.uuid_of("b"))
    assert report.changes[0].from_state == "cancelled"
    assert flow.task_row().state == "in_progress"
    (b,) = flow.claim("b")
    flow.run(b)
    (c,) = flow.claim("c")
    flow.run(c)
    assert flow.task_row().state == "complete"


def test_cancel_step_of_enqueued_waiting_for_retry_and_finished_steps(db: Database) -> None:
    flow = Flow(db)
    a, x = sorted(flow.claim("a", "x"), key=lambda s: s.name)
    flow.run(a)
    (b,) = flow.claim("b")
    flow.run(b, "retryable")  # b: waiting_for_retry (max_attempts 2)
    assert flow.states()["b"] == "waiting_for_retry"
    flow.operate(cancel_step, flow.uuid_of("b"))
    row = flow.step("b")
    assert (row.state, row.error["error_type"]) == ("cancelled", "cancelled")
    assert row.error["previous"]["error_type"] == "retryable_error"

    refused(flow, a.step_uuid, "it is complete", "not finished")
    refused(flow, flow.uuid_of("b"), "it is cancelled")
    flow.run(x, "permanent")
    refused(flow, x.step_uuid, "it is error")

    enqueued = Flow(db)
    enqueued.operate(cancel_step, enqueued.uuid_of("x"))
    assert enqueued.states()["x"] == "cancelled"
    enqueued.claim("a")  # x is no longer claimable

    cancelled = Flow(db)
    cancelled.operate(cancel_task, cancelled.task)
    refused(cancelled, cancelled.uuid_of("a"), "is cancelled")
