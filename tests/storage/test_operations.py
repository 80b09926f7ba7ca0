"""Operator commands (``duplex.storage.operations``) on SQLite and PostgreSQL, without any actor.

The workflow is driven by hand through the same functions the actors call (claim, commit,
release), so each test sets up exactly the moment it is about.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select

from duplex.clock import utcnow
from duplex.errors import InputError, TransitionError
from duplex.storage.db import Database
from duplex.storage.models import (
    domain_events,
    tasks,
    workflow_step_edges,
    workflow_step_transitions,
    workflow_steps,
)
from duplex.storage.operations import (
    OperatorReport,
    cancel_task,
    operator_identity,
    resolve_step,
    retry_step,
)
from duplex.storage.releases import release_claims
from tests.storage.support import FAN_IN, OPERATOR, Flow


def snapshot(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, to prove that a refused command wrote nothing."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with db.read() as conn:
        for table in (
            tasks,
            workflow_steps,
            workflow_step_edges,
            workflow_step_transitions,
            domain_events,
        ):
            out[table.name] = sorted((tuple(row) for row in conn.execute(select(table))), key=repr)
    return out


def refused(
    flow: Flow,
    operation: Callable[..., OperatorReport],
    target: str,
    error: type[Exception],
    *fragments: str,
) -> str:
    """Assert that the command raises ``error`` with a one-line message and writes nothing."""
    before = snapshot(flow.db)
    with pytest.raises(error) as info:
        flow.operate(operation, target, "should not happen")
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert snapshot(flow.db) == before
    return message


# --- cancel -------------------------------------------------------------------------------


def test_cancel_stops_everything_not_running(db: Database) -> None:
    flow = Flow(db)
    (_a, x) = sorted(flow.claim("a", "x"), key=lambda s: s.name)
    flow.run(x, "retryable")  # x waits for a retry
    assert flow.states() == {
        "a": "in_progress",
        "b": "pending",
        "c": "pending",
        "x": "waiting_for_retry",
    }
    report = flow.operate(cancel_task, flow.task, "customer withdrew")
    assert sorted(c.name for c in report.changes) == ["b", "c", "x"]
    assert not report.made_ready  # nothing to wake the workers for
    assert report.still_running == 1
    assert report.task_state == "cancelled"
    assert flow.states() == {
        "a": "in_progress",
        "b": "cancelled",
        "c": "cancelled",
        "x": "cancelled",
    }
    task = flow.task_row()
    assert task.state == "cancelled"
    assert task.completed_at is not None
    (*_, last) = flow.transitions("x")
    assert (last.from_state, last.to_state) == ("waiting_for_retry", "cancelled")
    assert last.worker_id == OPERATOR
    assert last.reason == "cancelled by operator: customer withdrew"
    assert flow.step("x").next_attempt_at is None

    # Nothing is left to claim.
    flow.claim()


def test_a_running_step_finishes_but_does_not_resume_a_cancelled_workflow(db: Database) -> None:
    flow = Flow(db)
    (a, x) = sorted(flow.claim("a", "x"), key=lambda s: s.name)
    flow.operate(cancel_task, flow.task)

    report = flow.run(a)  # success: recorded, but b is not enqueued
    assert report.enqueued == 0
    assert [o.step.name for o in report.applied] == ["a"]
    assert "step.completed" in [e.name for e in report.events]
    report = flow.run(x, "retryable")  # would be retried: cancelled instead
    assert report.next_retry_at is None
    assert flow.states() == {"a": "complete", "b": "cancelled", "c": "cancelled", "x": "cancelled"}
    assert flow.step("a").results == {"from": "a"}
    assert flow.step("x").error["error_type"] == "retryable_error"
    (*_, last) = flow.transitions("x")
    assert (last.from_state, last.to_state) == ("in_progress", "cancelled")
    assert "retry cancelled" in last.reason
    assert flow.task_row().state == "cancelled"
    flow.claim()


def test_a_permanent_failure_after_cancel_is_an_error(db: Database) -> None:
    flow = Flow(db)
    (a, _x) = sorted(flow.claim("a", "x"), key=lambda s: s.name)
    flow.operate(cancel_task, flow.task)
    flow.run(a, "permanent")
    assert flow.states()["a"] == "error"
    assert flow.task_row().state == "cancelled"


def test_a_claim_handed_back_after_cancel_is_cancelled(db: Database) -> None:
    flow = Flow(db)
    claimed = flow.claim("a", "x")
    flow.operate(cancel_task, flow.task)
    with db.write() as conn:
        released = release_claims(conn, claimed, worker_id="w1", now=utcnow(), reason="stopping")
    assert released == 2
    assert flow.states() == dict.fromkeys("abcx", "cancelled")
    (*_, last) = flow.transitions("a")
    assert (last.from_state, last.to_state, last.attempt) == ("in_progress", "cancelled", 0)
    flow.claim()


def test_cancel_of_an_errored_task_cancels_what_is_blocked(db: Database) -> None:
    flow = Flow(db)
    (a, x) = sorted(flow.claim("a", "x"), key=lambda s: s.name)
    flow.run(x)
    flow.run(a, "permanent")
    assert flow.task_row().state == "error"
    report = flow.operate(cancel_task, flow.task)
    assert sorted(c.name for c in report.changes) == ["b", "c"]
    assert flow.states() == {"a": "error", "b": "cancelled", "c": "cancelled", "x": "complete"}


def test_cancel_refuses_finished_tasks_and_unknown_ids(db: Database) -> None:
    flow = Flow(db)
    flow.operate(cancel_task, flow.task)
    refused(flow, cancel_task, flow.task, TransitionError, flow.task, "already cancelled")

    done = Flow(db, FAN_IN)
    for step in done.claim("p", "q"):
        done.run(step)
    (d,) = done.claim("d")
    done.run(d)
    assert done.task_row().state == "complete"
    refused(done, cancel_task, done.task, TransitionError, "already complete")

    unknown = str(uuid.uuid4())
    refused(flow, cancel_task, unknown, InputError, f"unknown task: {unknown}")
    refused(flow, cancel_task, "not-a-uuid", InputError, "unknown task: not-a-uuid")
    # A uuid the step table knows is still not a task.
    refused(flow, cancel_task, flow.uuid_of("a"), InputError, "unknown task")


def test_an_uppercase_uuid_is_accepted(db: Database) -> None:
    flow = Flow(db)
    report = flow.operate(cancel_task, flow.task.upper())
    assert report.task_uuid == flow.task
    assert flow.task_row().state == "cancelled"


# --- retry --------------------------------------------------------------------------------


def test_retry_gives_an_exhausted_step_one_more_attempt(db: Database) -> None:
    flow = Flow(db)
    (a, x) = sorted(flow.claim("a", "x"), key=lambda s: s.name)
    flow.run(x)
    flow.run(a)
    (b,) = flow.claim("b")
    flow.run(b, "retryable")
    (b,) = flow.claim("b")
    flow.run(b, "retryable")  # attempt 2 of 2: error
    assert flow.states()["b"] == "error"
    assert flow.task_row().state == "error"

    report = flow.operate(retry_step, flow.uuid_of("b"), "upstream fixed")
    assert report.task_state == "in_progress"
    assert report.made_ready  # the command wakes this host's workers (SQLite)
    assert [(c.name, c.from_state, c.to_state) for c in report.changes] == [
        ("b", "error", "enqueued")
    ]
    row = flow.step("b")
    assert (row.state, row.attempts, row.max_attempts) == ("enqueued", 2, 3)
    task = flow.task_row()
    assert (task.state, task.completed_at) == ("in_progress", None)
    (*_, last) = flow.transitions("b")
    assert (last.from_state, last.to_state, last.worker_id) == ("error", "enqueued", OPERATOR)
    assert last.reason.startswith("retried by operator: upstream fixed")
    assert "max_attempts raised to 3" in last.reason

    (b,) = flow.claim("b")
    assert (b.attempt, b.max_attempts) == (3, 3)
    assert flow.run(b).enqueued == 1
    (c,) = flow.claim("c")
    assert c.dependency_results == {"b": {"from": "b"}}
    flow.run(c)
    assert flow.task_row().state == "complete"


def test_retry_of_a_permanent_failure_keeps_max_attempts(db: Database) -> None:
    flow = Flow(db)
    (a, x) = sorted(flow.claim("a", "x"), key=lambda s: s.name)
    flow.run(x)
    flow.run(a)
    (b,) = flow.claim("b")
    flow.run(b, "permanent")  # attempt 1 of 2, but not retryable
    flow.operate(retry_step, flow.uuid_of("b"))
    row = flow.step("b")
    assert (row.state, row.max_attempts) == ("enqueued", 2)
    assert flow.transitions("b")[-1].reason == "retried by operator"


def test_retry_refuses_steps_not_in_error(db: Database) -> None:
    flow = Flow(db)
    (a, _x) = sorted(flow.claim("a", "x"), key=lambda s: s.name)
    refused(flow, retry_step, flow.uuid_of("a"), TransitionError, "in_progress", "'a'")
    refused(flow, retry_step, flow.uuid_of("b"), TransitionError, "pending")
    flow.run(a)
    refused(flow, retry_step, flow.uuid_of("a"), TransitionError, "complete")
    refused(flow, retry_step, flow.uuid_of("b"), TransitionError, "enqueued")
    unknown = str(uuid.uuid4())
    refused(flow, retry_step, unknown, InputError, f"unknown step: {unknown}")
    refused(flow, retry_step, flow.task, InputError, "unknown step")


def test_retry_and_resolve_refuse_steps_of_a_cancelled_task(db: Database) -> None:
    flow = Flow(db)
    (a, _x) = sorted(flow.claim("a", "x"), key=lambda s: s.name)
    flow.operate(cancel_task, flow.task)
    flow.run(a, "permanent")
    assert flow.states()["a"] == "error"
    refused(flow, retry_step, flow.uuid_of("a"), TransitionError, "is cancelled")
    refused(flow, resolve_step, flow.uuid_of("a"), TransitionError, "is cancelled")


# --- resolve ------------------------------------------------------------------------------


def test_resolve_unblocks_dependents(db: Database) -> None:
    flow = Flow(db)
    (a, x) = sorted(flow.claim("a", "x"), key=lambda s: s.name)
    flow.run(x)
    flow.run(a)
    (b,) = flow.claim("b")
    flow.run(b, "permanent")
    assert flow.task_row().state == "error"

    report = flow.operate(resolve_step, flow.uuid_of("b"), "done by hand")
    assert [(c.name, c.from_state, c.to_state) for c in report.changes] == [
        ("b", "error", "resolved_manually"),
        ("c", "pending", "enqueued"),
    ]
    assert report.made_ready
    assert report.task_state == "in_progress"
    (*_, last) = flow.transitions("b")
    assert (last.to_state, last.worker_id, last.reason) == (
        "resolved_manually",
        OPERATOR,
        "resolved by operator: done by hand",
    )
    (enqueued,) = flow.transitions("c")[-1:]
    assert (enqueued.from_state, enqueued.to_state, enqueued.worker_id) == (
        "pending",
        "enqueued",
        OPERATOR,
    )
    (c,) = flow.claim("c")
    assert c.dependency_results == {"b": {}}  # a resolved parent has no result
    flow.run(c)
    assert flow.task_row().state == "complete"


def test_resolve_waits_for_the_other_parents(db: Database) -> None:
    flow = Flow(db, FAN_IN)
    p, q = sorted(flow.claim("p", "q"), key=lambda s: s.name)
    flow.run(p, "permanent")
    report = flow.operate(resolve_step, flow.uuid_of("p"))
    assert [c.name for c in report.changes] == ["p"]  # q still runs: d stays pending
    assert not report.made_ready
    assert flow.states()["d"] == "pending"
    flow.run(q)
    (d,) = flow.claim("d")
    assert d.dependency_results == {"p": {}, "q": {"from": "q"}}


def test_resolve_of_the_last_failure_completes_the_task(db: Database) -> None:
    flow = Flow(db, FAN_IN)
    p, q = sorted(flow.claim("p", "q"), key=lambda s: s.name)
    flow.run(p)
    flow.run(q)
    (d,) = flow.claim("d")
    flow.run(d, "permanent")
    assert flow.task_row().state == "error"
    report = flow.operate(resolve_step, flow.uuid_of("d"))
    assert report.task_state == "complete"
    task = flow.task_row()
    assert task.completed_at is not None


def test_resolve_skips_a_step_that_has_not_run(db: Database) -> None:
    flow = Flow(db)
    # b is pending (a has not run); resolving it skips it, and c, whose only parent is b,
    # is ready at once.
    report = flow.operate(resolve_step, flow.uuid_of("b"))
    assert [(c.name, c.from_state, c.to_state) for c in report.changes] == [
        ("b", "pending", "resolved_manually"),
        ("c", "pending", "enqueued"),
    ]
    claimed = {s.name: s for s in flow.claim("a", "c", "x")}
    for step in claimed.values():
        assert flow.run(step).enqueued == 0  # a's completion finds b already settled
    assert flow.states() == {
        "a": "complete",
        "b": "resolved_manually",
        "c": "complete",
        "x": "complete",
    }
    assert flow.task_row().state == "complete"


def test_resolve_refuses_running_and_finished_steps(db: Database) -> None:
    flow = Flow(db)
    (a, x) = sorted(flow.claim("a", "x"), key=lambda s: s.name)
    refused(flow, resolve_step, flow.uuid_of("a"), TransitionError, "in_progress")
    flow.run(a)
    refused(flow, resolve_step, flow.uuid_of("a"), TransitionError, "complete")
    flow.run(x, "permanent")
    flow.operate(resolve_step, flow.uuid_of("x"))
    refused(flow, resolve_step, flow.uuid_of("x"), TransitionError, "resolved_manually")
    refused(flow, resolve_step, "zzz", InputError, "unknown step: zzz")


def test_operator_identity_names_the_user() -> None:
    identity = operator_identity()
    assert identity.startswith("operator:")
    assert len(identity) > len("operator:")
