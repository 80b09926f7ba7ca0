"""Signals on both databases: a signal completes its waiting step and readies the dependents in
the one transaction that stores it; an early one waits for the wait; the same id acts once;
every refusal is one line and writes nothing."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import update

from duplex.clock import utcnow
from duplex.errors import InputError, TransitionError
from duplex.storage.db import Database
from duplex.storage.models import domain_events, tasks
from duplex.storage.operations import cancel_task, resolve_step
from duplex.storage.retention import prune_batch
from duplex.storage.signals import COMPLETED, DUPLICATE, STORED
from tests.dynamic.support import (
    APPROVAL,
    events_of,
    signal,
    signal_rows,
    snapshot,
    start_wait,
)
from tests.storage.support import Flow


def test_a_signal_completes_the_waiting_step_and_readies_its_dependents(db: Database) -> None:
    flow = Flow(db, APPROVAL)
    start_wait(flow)
    assert flow.states()["approval"] == "waiting"

    report = signal(flow, payload={"approved_by": "ana"}, signal_id="mail-1")

    assert report.outcome == COMPLETED
    assert flow.states() == {
        "prepare": "complete",
        "approval": "complete",
        "ship": "enqueued",
        "notify": "enqueued",
    }
    assert flow.step("approval").results == {"approved_by": "ana"}
    assert flow.step("approval").next_attempt_at is None
    assert sorted(report.made_ready) == ["notify", "ship"]
    assert report.namespaces == (flow.namespace,)
    assert [(t.from_state, t.to_state) for t in flow.transitions("approval")] == [
        (None, "pending"),
        ("pending", "waiting"),
        ("waiting", "complete"),
    ]
    assert flow.transitions("approval")[-1].reason == "signal approved received (id mail-1)"
    assert [(t.from_state, t.to_state) for t in flow.transitions("ship")][-1] == (
        "pending",
        "enqueued",
    )
    assert [name for name, _ in events_of(flow, "approval")] == ["step.completed"]
    assert [e.name for e in report.events] == ["step.completed"]
    (row,) = signal_rows(flow)
    assert (row.signal_id, row.step_uuid) == ("mail-1", flow.uuid_of("approval"))
    assert row.used_at is not None
    assert flow.task_row().state == "in_progress"
    assert "enqueued" in report.summary
    assert "\n" not in report.summary
    # The dependents read the payload as the wait step's result.
    claimed = {step.name: step for step in flow.claim("ship", "notify")}
    assert claimed["ship"].dependency_results["approval"] == {"approved_by": "ana"}


@pytest.mark.parametrize("payload", [[1, "two"], 7, None], ids=["list", "number", "null"])
def test_a_payload_that_is_not_an_object_is_kept_under_payload(
    db: Database, payload: object
) -> None:
    flow = Flow(db, APPROVAL)
    start_wait(flow)

    signal(flow, payload=payload)

    assert flow.step("approval").results == {"payload": payload}


def test_a_signal_before_the_wait_starts_is_kept_and_used_when_it_starts(db: Database) -> None:
    flow = Flow(db, APPROVAL)

    report = signal(flow, payload={"early": True}, signal_id="early")

    assert report.outcome == STORED
    assert flow.states()["approval"] == "pending"
    (row,) = signal_rows(flow)
    assert row.used_at is None
    assert row.step_uuid is None
    # A second, different signal for the same wait is refused: one would be dropped unseen.
    before = snapshot(db)
    with pytest.raises(TransitionError, match="already stored"):
        signal(flow, payload={"late": True}, signal_id="other")
    assert snapshot(db) == before
    # ...but the same one again is a harmless repeat.
    assert signal(flow, payload={"early": True}, signal_id="early").outcome == DUPLICATE

    start_wait(flow)

    assert flow.states()["approval"] == "complete"
    assert flow.step("approval").results == {"early": True}
    assert {flow.states()[name] for name in ("ship", "notify")} == {"enqueued"}
    (row,) = signal_rows(flow)
    assert row.used_at is not None
    assert row.step_uuid == flow.uuid_of("approval")
    assert [name for name, _ in events_of(flow, "approval")] == ["step.completed"]


def test_the_same_signal_id_twice_acts_once(db: Database) -> None:
    flow = Flow(db, APPROVAL)
    start_wait(flow)
    signal(flow, payload={"n": 1}, signal_id="s-1")
    before = snapshot(db)

    again = signal(flow, payload={"n": 2}, signal_id="s-1")

    assert again.outcome == DUPLICATE
    assert "already received" in again.summary
    assert snapshot(db) == before
    assert flow.step("approval").results == {"n": 1}


def test_a_signal_without_an_id_gets_one(db: Database) -> None:
    flow = Flow(db, APPROVAL)
    start_wait(flow)

    report = signal(flow, payload={})

    assert str(uuid.UUID(report.signal_id)) == report.signal_id
    assert signal_rows(flow)[0].signal_id == report.signal_id


def _finished_by_signal(flow: Flow) -> None:
    start_wait(flow)
    signal(flow, payload={}, signal_id="first")


def _resolved(flow: Flow) -> None:
    start_wait(flow)
    flow.operate(resolve_step, flow.uuid_of("approval"))


def _cancelled(flow: Flow) -> None:
    flow.operate(cancel_task, flow.task)


@pytest.mark.parametrize(
    ("setup", "kwargs", "error", "fragment"),
    [
        (_finished_by_signal, {}, TransitionError, "already complete"),
        (_resolved, {}, TransitionError, "already resolved_manually"),
        (_cancelled, {}, TransitionError, "the task is cancelled"),
        (start_wait, {"name": "rejected"}, InputError, "it waits for approved"),
        (start_wait, {"task": str(uuid.uuid4())}, InputError, "unknown task"),
        (start_wait, {"task": "not-a-uuid"}, InputError, "not a UUID"),
        (start_wait, {"payload": float("nan")}, InputError, "must be JSON"),
        (start_wait, {"signal_id": ""}, InputError, "signal id"),
    ],
    ids=[
        "complete",
        "resolved",
        "cancelled_task",
        "unknown_name",
        "unknown_task",
        "bad_uuid",
        "nan",
        "empty_id",
    ],
)
def test_a_refused_signal_says_why_in_one_line_and_writes_nothing(
    db: Database,
    setup: Callable[[Flow], None],
    kwargs: dict[str, object],
    error: type[Exception],
    fragment: str,
) -> None:
    flow = Flow(db, APPROVAL)
    setup(flow)
    before = snapshot(db)

    with pytest.raises(error) as refused:
        signal(flow, **{"payload": {"x": 1}, "signal_id": "fresh", **kwargs})  # type: ignore[arg-type]

    assert fragment in str(refused.value)
    assert "\n" not in str(refused.value)
    assert snapshot(db) == before


def test_a_signal_id_used_for_another_name_is_refused(db: Database) -> None:
    flow = Flow(db, APPROVAL)
    signal(flow, payload={}, signal_id="s")
    before = snapshot(db)

    with pytest.raises(InputError, match="already used for signal approved"):
        signal(flow, "rejected", payload={}, signal_id="s")

    assert snapshot(db) == before


def test_pruning_a_finished_task_removes_its_signals(db: Database) -> None:
    flow = Flow(db, APPROVAL)
    start_wait(flow)
    signal(flow, payload={"ok": True}, signal_id="mail-9")
    for claimed in flow.claim("ship", "notify"):
        flow.run(claimed)
    assert flow.task_row().state == "complete"
    old = utcnow() - timedelta(days=10)
    with db.write() as conn:
        conn.execute(update(tasks).where(tasks.c.task_uuid == flow.task).values(completed_at=old))
        conn.execute(
            update(domain_events)
            .where(domain_events.c.task_uuid == flow.task)
            .values(created_at=old, published_at=old)
        )
    assert len(signal_rows(flow)) == 1

    with db.write() as conn:
        pruned = prune_batch(conn, cutoff=utcnow() - timedelta(days=1), limit=10)

    assert pruned.tasks == 1
    assert signal_rows(flow) == []
