"""``duplex complete`` and ``duplex resolve`` on both databases: a step finished by hand moves
the task on as a result does (dependents ready, a wait after it starts waiting), and the
result given by hand is what the dependents read."""

from __future__ import annotations

import pytest

from duplex.clock import utcnow
from duplex.errors import InputError, TransitionError
from duplex.storage.db import Database
from duplex.storage.operations import OperatorReport, complete_step, resolve_step
from duplex.storage.signals import STORED
from tests.dynamic.support import APPROVAL, events_of, signal, snapshot, start_wait
from tests.storage.support import OPERATOR, Flow


def complete(flow: Flow, name: str, result: object, reason: str | None = None) -> OperatorReport:
    with flow.db.write() as conn:
        return complete_step(
            conn,
            flow.uuid_of(name),
            result,  # type: ignore[arg-type]
            operator=OPERATOR,
            now=utcnow(),
            reason=reason,
        )


def test_complete_gives_a_failed_step_its_result_and_the_dependents_read_it(
    db: Database,
) -> None:
    flow = Flow(db)  # a -> b -> c, x
    (a, _x) = flow.claim("a", "x")
    flow.run(a)
    (b,) = flow.claim("b")
    flow.run(b, "permanent")
    assert flow.states()["b"] == "error"

    report = complete(flow, "b", {"total": 42}, reason="fixed upstream")

    assert flow.states()["b"] == "complete"
    assert flow.step("b").results == {"total": 42}
    last = flow.transitions("b")[-1]
    assert (last.from_state, last.to_state, last.worker_id) == ("error", "complete", OPERATOR)
    assert last.reason == "completed by operator: fixed upstream"
    assert [name for name, _ in events_of(flow, "b")][-1] == "step.completed"
    assert report.summary.startswith("step b (")
    assert "completed by hand; enqueued c" in report.summary
    assert report.made_ready
    (c,) = flow.claim("c")
    assert c.dependency_results["b"] == {"total": 42}


def test_completing_the_step_before_a_wait_starts_the_wait(db: Database) -> None:
    flow = Flow(db, APPROVAL)

    report = complete(flow, "prepare", {"by": "hand"})

    assert flow.states()["approval"] == "waiting"
    assert flow.step("approval").next_attempt_at is not None
    assert "waiting approval" in report.summary
    assert not report.made_ready  # no handler step to claim: no one to wake


def test_resolving_the_step_before_a_wait_starts_the_wait_which_uses_a_stored_signal(
    db: Database,
) -> None:
    flow = Flow(db, APPROVAL)
    assert signal(flow, payload={"early": 1}).outcome == STORED

    report = flow.operate(resolve_step, flow.uuid_of("prepare"))

    assert flow.states() == {
        "prepare": "resolved_manually",
        "approval": "complete",
        "ship": "enqueued",
        "notify": "enqueued",
    }
    assert flow.step("approval").results == {"early": 1}
    # The wait that started and completed at once is one change, pending -> complete.
    moved = {c.name: (c.from_state, c.to_state) for c in report.changes}
    assert moved["approval"] == ("pending", "complete")
    assert [e.name for e in report.events] == ["step.completed"]
    assert [name for name, _ in events_of(flow, "approval")] == ["step.completed"]


def test_complete_of_a_waiting_wait_step_completes_it_with_the_result(db: Database) -> None:
    flow = Flow(db, APPROVAL)
    start_wait(flow)

    complete(flow, "approval", {"approved_by": "operator"})

    assert flow.step("approval").results == {"approved_by": "operator"}
    assert {flow.states()[n] for n in ("ship", "notify")} == {"enqueued"}


def test_complete_refuses_a_running_or_finished_step_and_a_result_that_is_no_object(
    db: Database,
) -> None:
    flow = Flow(db)
    (a, _) = flow.claim("a", "x")
    before = snapshot(db)
    with pytest.raises(TransitionError, match="it is in_progress"):
        complete(flow, "a", {"x": 1})
    with pytest.raises(InputError, match="JSON object"):
        complete(flow, "b", [1, 2])
    assert snapshot(db) == before
    flow.run(a)
    before = snapshot(db)
    with pytest.raises(TransitionError, match="it is complete"):
        complete(flow, "a", {"x": 1})
    assert snapshot(db) == before
