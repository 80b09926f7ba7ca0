"""Checkpoints through a real in-process ``Worker`` (SQLite): the store reaches the handler, and
an attempt that timed out cannot save over what the next attempt will resume from."""

from __future__ import annotations

import threading
from typing import Any

from duplex.clock import utcnow
from duplex.errors import CheckpointRejected
from duplex.handlers import HandlerRegistry, StepContext
from duplex.storage.db import Database
from duplex.storage.pauses import TEMPLATE, pause, resume
from duplex.storage.results import CommitReport
from tests.actors.support import running_worker, step_row, submit
from tests.conftest import wait_until
from tests.storage.support import OPERATOR

WAIT_S = 30.0


def test_a_timed_out_attempts_late_checkpoint_is_rejected(sqlite_db: Database) -> None:
    saved, gate, late_done = threading.Event(), threading.Event(), threading.Event()
    timeout_committed, other_failure = threading.Event(), threading.Event()
    rejected: list[str] = []
    resumed_from: list[Any] = []
    failures: list[str] = []

    def steady(ctx: StepContext) -> dict[str, Any]:
        if ctx.attempt > 1:
            resumed_from.append(ctx.checkpoint_state)
            return {"resumed_from": ctx.checkpoint_state}
        ctx.checkpoint({"done": 1})
        saved.set()
        # Held until its timeout is committed: from then on it runs without a claim.
        gate.wait(WAIT_S)
        try:
            ctx.checkpoint({"done": 2})
        except CheckpointRejected as exc:
            rejected.append(str(exc))
        finally:
            late_done.set()
        return {"late": True}

    def observer(report: CommitReport) -> None:
        for outcome in report.applied:
            if outcome.failure is None:
                continue
            if outcome.failure.error_type == "handler_timeout":
                timeout_committed.set()
            else:  # e.g. the handler found no store: fail now, not at a wait's timeout
                failures.append(outcome.failure.message)
                other_failure.set()

    registry = HandlerRegistry()
    registry.register("t.steady", steady)
    with running_worker(
        sqlite_db, 1, registry, observer=observer, worker_settings={"handler_timeout_ms": 500}
    ) as (worker, _):
        try:
            task = submit(
                sqlite_db, [{"name": "steady", "handler": "t.steady", "max_attempts": 2}], "ckpt"
            )
            worker.nudge()
            assert wait_until(lambda: saved.is_set() or other_failure.is_set(), WAIT_S)
            assert failures == []
            # The retry must not start before the late checkpoint was tried: held by a pause
            # of the template until then (claims leave paused work out).
            with sqlite_db.write() as conn:
                pause(conn, kind=TEMPLATE, name="ckpt", operator=OPERATOR, now=utcnow())
            assert timeout_committed.wait(WAIT_S)
            gate.set()
            assert late_done.wait(WAIT_S)

            assert len(rejected) == 1
            assert "attempt 1 rejected" in rejected[0]
            row = step_row(sqlite_db, task, "steady")
            assert (row.state, row.attempts, row.checkpoint) == (
                "waiting_for_retry",
                1,
                {"done": 1},
            )

            with sqlite_db.write() as conn:
                resume(conn, kind=TEMPLATE, name="ckpt")
            worker.nudge()
            assert wait_until(lambda: step_row(sqlite_db, task, "steady").state == "complete")
        finally:
            gate.set()
    assert resumed_from == [{"done": 1}]
    row = step_row(sqlite_db, task, "steady")
    assert (row.attempts, row.results, row.checkpoint) == (
        2,
        {"resumed_from": {"done": 1}},
        {"done": 1},
    )
