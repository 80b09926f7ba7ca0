"""Stuck, cancelled and thread-killing handlers (docs/architecture.md: Guarantee 6, Threads).

Real actors on SQLite. A stuck sync handler gets its ``handler_timeout`` result committed on
time, its slot is replaced, the abandoned thread is counted until it returns, and its late
result is rejected; an ``async def`` handler is cancelled for real; a handler raising a
``BaseException`` becomes a result and the worker keeps going.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import select

from duplex.actors.completion_processor import CommitObserver
from duplex.clock import utcnow
from duplex.handlers import HandlerRegistry, StepContext
from duplex.storage.db import Database
from duplex.storage.models import domain_events
from duplex.storage.results import CommitReport
from duplex.storage.submission import create_task
from duplex.templates import TaskTemplate
from duplex.worker.wiring import Worker
from tests.actors.support import step_row
from tests.conftest import make_settings, wait_until


def submit(db: Database, *steps: dict[str, Any]) -> str:
    template = TaskTemplate.model_validate({"name": "t", "steps": list(steps)})
    with db.write() as conn:
        return create_task(conn, template, {}, now=utcnow())


@contextmanager
def running_worker(
    db: Database,
    registry: HandlerRegistry,
    *,
    n: int = 1,
    observer: CommitObserver | None = None,
) -> Iterator[Worker]:
    worker = Worker(
        make_settings(
            str(db.url),
            worker={"max_concurrent_handlers": n},
            event_system={"polling_interval_ms": 20},
        ),
        db,
        registry=registry,
        observer=observer,
    )
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def test_stuck_sync_handler_times_out_on_time_and_its_slot_is_replaced(
    sqlite_db: Database,
) -> None:
    registry = HandlerRegistry()
    stuck_started, unstick, stuck_returned = threading.Event(), threading.Event(), threading.Event()
    timeout_committed = threading.Event()
    other_ran = threading.Event()
    returned_before_commit: list[bool] = []

    def stuck(ctx: StepContext) -> dict[str, bool]:
        # Ignores ctx.cancelled on purpose: a thread nobody can stop.
        stuck_started.set()
        try:
            unstick.wait(30)
            ctx.emit("stuck.late", {})
            return {"late": True}
        finally:
            stuck_returned.set()

    def other(ctx: StepContext) -> dict[str, bool]:
        other_ran.set()
        return {"ran": True}

    def observer(report: CommitReport) -> None:
        for outcome in report.applied:
            if outcome.failure is not None and outcome.failure.error_type == "handler_timeout":
                returned_before_commit.append(stuck_returned.is_set())
                timeout_committed.set()

    registry.register("t.stuck", stuck)
    registry.register("t.other", other)
    with running_worker(sqlite_db, registry, n=1, observer=observer) as worker:
        try:
            stuck_task = submit(
                sqlite_db,
                {"name": "stuck", "handler": "t.stuck", "timeout_ms": 200, "max_attempts": 1},
            )
            worker.nudge()
            assert stuck_started.wait(10)
            # The only slot is taken; this step can only run in the replacement worker.
            other_task = submit(sqlite_db, {"name": "other", "handler": "t.other"})
            worker.nudge()

            assert timeout_committed.wait(10)
            assert returned_before_commit == [False]
            row = step_row(sqlite_db, stuck_task, "stuck")
            assert (row.state, row.attempts, row.error["error_type"]) == (
                "error",
                1,
                "handler_timeout",
            )

            assert other_ran.wait(10)
            assert wait_until(lambda: step_row(sqlite_db, other_task, "other").state == "complete")
            assert not stuck_returned.is_set()
            dispatcher = worker.status()["dispatcher"]
            assert dispatcher["abandoned_threads"] == 1
            assert dispatcher["timeouts"] == 1
        finally:
            unstick.set()

        assert stuck_returned.wait(10)
        assert wait_until(lambda: worker.status()["dispatcher"]["abandoned_threads"] == 0)
        assert wait_until(lambda: worker.status()["completion"]["rejected"] == 1)
        status = worker.status()
        # Two results were applied (the timeout and "other"); the late success was not.
        assert status["completion"]["committed"] == 2
        assert status["dispatcher"]["idle"] == 1

    row = step_row(sqlite_db, stuck_task, "stuck")
    assert (row.state, row.attempts, row.error["error_type"], row.results) == (
        "error",
        1,
        "handler_timeout",
        None,
    )
    with sqlite_db.read() as conn:
        names = sorted(
            conn.execute(
                select(domain_events.c.name).where(domain_events.c.task_uuid == stuck_task)
            ).scalars()
        )
    assert names == ["step.failed"]  # nothing of the late result, not even its own event


def test_timed_out_async_handler_is_really_cancelled(sqlite_db: Database) -> None:
    registry = HandlerRegistry()
    started, cancelled, finally_ran = threading.Event(), threading.Event(), threading.Event()

    async def sleeper(ctx: StepContext) -> dict[str, bool]:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finally:
            finally_ran.set()
        return {"slept": True}

    registry.register("t.sleeper", sleeper)
    with running_worker(sqlite_db, registry) as worker:
        task = submit(
            sqlite_db,
            {"name": "sleeper", "handler": "t.sleeper", "timeout_ms": 200, "max_attempts": 1},
        )
        worker.nudge()
        assert started.wait(10)
        assert cancelled.wait(10)
        assert finally_ran.wait(5)
        assert wait_until(lambda: worker.status()["dispatcher"]["abandoned_threads"] == 0, 5)
        assert wait_until(lambda: worker.status()["completion"]["rejected"] == 1, 5)
        status = worker.status()
        assert status["dispatcher"]["timeouts"] == 1
        assert status["dispatcher"]["idle"] == 1
    row = step_row(sqlite_db, task, "sleeper")
    assert (row.state, row.error["error_type"]) == ("error", "handler_timeout")


@pytest.mark.parametrize(
    "exc", [SystemExit(3), KeyboardInterrupt()], ids=lambda e: type(e).__name__
)
def test_handler_raising_base_exception_does_not_kill_the_worker(
    sqlite_db: Database, exc: BaseException
) -> None:
    registry = HandlerRegistry()

    def boom(ctx: StepContext) -> None:
        raise exc

    def fine(ctx: StepContext) -> dict[str, bool]:
        return {"fine": True}

    registry.register("t.boom", boom)
    registry.register("t.fine", fine)
    # One slot: "later" can only run on the very worker whose handler raised.
    with running_worker(sqlite_db, registry, n=1) as worker:
        task = submit(sqlite_db, {"name": "boom", "handler": "t.boom"})
        worker.nudge()
        assert wait_until(lambda: step_row(sqlite_db, task, "boom").state == "error")
        second = submit(sqlite_db, {"name": "later", "handler": "t.fine"})
        worker.nudge()
        assert wait_until(lambda: step_row(sqlite_db, second, "later").state == "complete")
        # Every actor still answers, and the one slot is back.
        status = worker.status()
        assert status["dispatcher"]["idle"] == 1
        assert status["dispatcher"]["abandoned_threads"] == 0
        assert status["completion"]["committed"] == 2
    row = step_row(sqlite_db, task, "boom")
    assert (row.state, row.attempts) == ("error", 1)  # not retried
    assert row.error["error_type"] == "handler_aborted"
    assert type(exc).__name__ in row.error["message"]
