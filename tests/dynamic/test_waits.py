"""Waits ended by time, on both databases: a wait's timeout fails it (``wait_timeout``), a sleep
completes at its time and its dependents go on; the sweep ends each exactly once. The clock is
an argument: no test waits for time to pass."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from duplex.clock import utcnow
from duplex.commit.buffer import CommitBuffer
from duplex.commit.committer import Committer
from duplex.errors import WAIT_TIMEOUT
from duplex.storage.db import Database
from duplex.storage.operations import retry_step
from duplex.storage.queries import count_open_work
from duplex.storage.signals import COMPLETED
from duplex.storage.waits import _DUE, end_due_waits, find_due_waits
from tests.conftest import sqlite_database
from tests.dynamic.support import APPROVAL, NAP, events_of, signal, snapshot, start_wait
from tests.storage.support import POLICY, Flow, claim

SWEEPER = "worker-sweep"


def sweep(db: Database, minutes: float) -> list[str]:
    """Find and end the waits due ``minutes`` from now; return the steps found due."""
    now = utcnow() + timedelta(minutes=minutes)
    with db.read() as conn:
        due = find_due_waits(conn, now=now)
    with db.write() as conn:
        end_due_waits(conn, due, now=now, worker_id=SWEEPER)
    return due


def test_a_wait_that_gets_no_signal_in_time_fails_as_wait_timeout(db: Database) -> None:
    flow = Flow(db, APPROVAL)
    start_wait(flow)
    approval = flow.step("approval")
    assert approval.next_attempt_at is not None

    assert sweep(db, 0.5) == []  # a minute's timeout: not yet
    assert sweep(db, 1.01) == [approval.step_uuid]

    step = flow.step("approval")
    assert step.state == "error"
    assert step.error["error_type"] == WAIT_TIMEOUT
    assert step.error["retryable"] is False
    assert step.next_attempt_at is None
    last = flow.transitions("approval")[-1]
    assert (last.from_state, last.to_state, last.worker_id) == ("waiting", "error", SWEEPER)
    assert last.reason.startswith(f"{WAIT_TIMEOUT}: signal approved did not come by")
    ((name, payload),) = events_of(flow, "approval")
    assert name == "step.failed"
    assert payload["error_type"] == WAIT_TIMEOUT
    assert flow.states()["ship"] == "pending"
    assert flow.task_row().state == "error"
    # Ended once: the next sweep finds nothing.
    assert sweep(db, 2) == []


def test_a_sleep_completes_at_its_time_and_its_dependent_goes_on(db: Database) -> None:
    flow = Flow(db, NAP)
    start_wait(flow)
    assert flow.states()["pause"] == "waiting"

    assert sweep(db, 4.9) == []
    sweep(db, 5.01)

    assert flow.states() == {"prepare": "complete", "pause": "complete", "ship": "enqueued"}
    assert flow.step("pause").results == {}
    assert [name for name, _ in events_of(flow, "pause")] == ["step.completed"]
    assert flow.transitions("pause")[-1].reason.startswith("slept until ")
    # Ready from the sweep's (future) time on.
    (ship,) = claim(db, utcnow() + timedelta(minutes=6), namespaces=(flow.namespace,))
    assert (ship.name, ship.dependency_results) == ("ship", {"pause": {}})


def test_a_wait_a_signal_completed_after_the_sweep_found_it_is_left_alone(db: Database) -> None:
    flow = Flow(db, APPROVAL)
    start_wait(flow)
    now = utcnow() + timedelta(minutes=2)
    with db.read() as conn:
        due = find_due_waits(conn, now=now)
    assert due == [flow.uuid_of("approval")]
    # The signal lands between the sweep's read and its write.
    assert signal(flow, payload={"ok": 1}).outcome == COMPLETED
    before = snapshot(db)

    with db.write() as conn:
        report = end_due_waits(conn, due, now=now, worker_id=SWEEPER)

    assert report.ended == []
    assert report.events == []
    assert snapshot(db) == before
    assert flow.step("approval").results == {"ok": 1}


def test_retry_of_a_timed_out_wait_waits_once_more_from_now(db: Database) -> None:
    flow = Flow(db, APPROVAL)
    start_wait(flow)
    sweep(db, 1.01)

    before = utcnow()
    report = flow.operate(retry_step, flow.uuid_of("approval"))

    step = flow.step("approval")
    assert step.state == "waiting"
    assert before + timedelta(minutes=1) <= step.next_attempt_at <= utcnow() + timedelta(minutes=1)
    assert "waiting once more" in report.summary
    assert flow.task_row().state == "in_progress"
    assert signal(flow, payload={"late": "but fine"}).outcome == COMPLETED
    assert flow.states()["ship"] == "enqueued"


def test_the_committer_sweep_ends_due_waits_and_wakes_the_intake(db: Database) -> None:
    flow = Flow(db, NAP)
    start_wait(flow)
    later = utcnow() + timedelta(minutes=6)
    committer = Committer(
        db,
        CommitBuffer(batch_size=10),
        policy=POLICY,
        worker_id=SWEEPER,
        claim_timeout_s=30,
        clock=lambda: later,
    )

    announcement = committer.sweep_waits()

    assert announcement is not None
    assert announcement.wake_intake
    assert [step.step_uuid for step in announcement.report.ready] == [flow.uuid_of("ship")]
    assert [e.name for e in announcement.report.events] == ["step.completed"]
    assert committer.sweep_waits() is None  # nothing left to end


def test_the_sweep_reads_only_the_index_of_waits_that_end(tmp_path: Path) -> None:
    """Every worker runs it every second: it must not scan the claim index's waiting rows."""
    db = sqlite_database(tmp_path / "plan.db")
    try:
        with db.read() as conn:
            sql = str(_DUE.compile(conn))
            plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", (utcnow(), 200, 0)).all()
    finally:
        db.dispose()
    details = " ".join(str(row[-1]) for row in plan)
    assert "ix_workflow_steps_waiting_until" in details
    assert "TEMP B-TREE" not in details  # in time order straight from the index


def test_run_until_idle_waits_for_a_sleep_but_not_for_a_wait_without_timeout(
    db: Database,
) -> None:
    sleeping = Flow(db, NAP)
    start_wait(sleeping)
    no_timeout = Flow(db, APPROVAL.replace("timeout_ms = 60000\n", ""))
    start_wait(no_timeout)
    with db.read() as conn:
        # A sleep ends by itself; a wait with no timeout only by a signal (or an operator).
        assert count_open_work(conn, [sleeping.namespace]) == 1
        assert count_open_work(conn, [no_timeout.namespace]) == 0
