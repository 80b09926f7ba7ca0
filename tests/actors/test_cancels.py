"""Cancelling running attempts (``duplex cancel``; docs/architecture.md, Threads cannot be
killed): real actors on SQLite, the cancel committed through a connection of its own, as the
CLI does. The worker never hears from the command: its sweep finds the cancelled attempts.

A sync handler sees ``ctx.cancelled`` within the sweep interval, an ``async def`` handler is
cancelled for real, the steps end ``cancelled`` with ``error_type = cancelled``, and what the
handlers return afterwards is rejected, never recorded as complete.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from sqlalchemy import select

from duplex.clock import utcnow
from duplex.handlers import HandlerRegistry, StepContext
from duplex.settings import DatabaseSettings
from duplex.storage.cancels import cancel_step
from duplex.storage.db import Database
from duplex.storage.models import tasks
from duplex.storage.operations import cancel_task
from duplex.storage.submission import create_task
from duplex.templates import TaskTemplate
from duplex.worker.wiring import Worker
from tests.actors.support import step_row
from tests.conftest import make_settings, wait_until

SWEEP_MS = 100
# The bound: one sweep interval, plus the margin of a busy test machine.
BOUND_S = SWEEP_MS / 1000 + 1.0


def submit(db: Database, *steps: dict[str, Any]) -> str:
    template = TaskTemplate.model_validate({"name": "t", "steps": list(steps)})
    with db.write() as conn:
        return create_task(conn, template, {}, now=utcnow())


def test_a_cancel_committed_elsewhere_reaches_running_handlers_within_the_sweep(
    sqlite_db: Database,
) -> None:
    registry = HandlerRegistry()
    started = {name: threading.Event() for name in ("sync", "async", "alone")}
    seen: dict[str, float] = {}

    def blocks(ctx: StepContext) -> dict[str, bool]:
        started[ctx.step_name].set()
        if ctx.cancelled.wait(30):
            seen[ctx.step_name] = time.monotonic()
        return {"late": True}  # must never be recorded

    async def sleeps(ctx: StepContext) -> dict[str, bool]:
        started[ctx.step_name].set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen[ctx.step_name] = time.monotonic()
            raise
        return {"late": True}

    registry.register("t.blocks", blocks)
    registry.register("t.sleeps", sleeps)
    settings = make_settings(
        str(sqlite_db.url),
        worker={"max_concurrent_handlers": 3, "deadline_sweep_interval_ms": SWEEP_MS},
        event_system={"polling_interval_ms": 20},
    )
    worker = Worker(settings, sqlite_db, registry=registry)
    # The operator's own connection, as `duplex cancel` opens one.
    operator = Database(DatabaseSettings(url=str(sqlite_db.url)))
    worker.start()
    try:
        task = submit(
            sqlite_db,
            {"name": "sync", "handler": "t.blocks", "timeout_ms": 60_000},
            {"name": "async", "handler": "t.sleeps", "timeout_ms": 60_000},
            {"name": "after", "handler": "t.blocks", "depends_on": ["sync"]},
        )
        other = submit(sqlite_db, {"name": "alone", "handler": "t.blocks", "timeout_ms": 60_000})
        worker.nudge()
        for event in started.values():
            assert event.wait(10)

        with operator.write() as conn:
            report = cancel_task(conn, task, operator="operator:test", now=utcnow())
        cancelled_at = time.monotonic()
        assert report.still_running == 2
        with operator.write() as conn:
            cancel_step(
                conn,
                step_row(sqlite_db, other, "alone").step_uuid,
                operator="operator:test",
                now=utcnow(),
            )
        step_cancelled_at = time.monotonic()

        assert wait_until(lambda: len(seen) == 3, timeout_s=10)
        assert seen["sync"] - cancelled_at <= BOUND_S
        assert seen["async"] - cancelled_at <= BOUND_S
        assert seen["alone"] - step_cancelled_at <= BOUND_S

        def settled() -> bool:
            return step_row(sqlite_db, other, "alone").state == "cancelled" and all(
                step_row(sqlite_db, task, name).state == "cancelled"
                for name in ("sync", "async", "after")
            )

        assert wait_until(settled, timeout_s=10)
        # The handlers' late returns reach the commit and are rejected by its guard.
        assert wait_until(lambda: worker.status()["completion"]["rejected"] == 3, timeout_s=10)
        assert wait_until(lambda: worker.status()["dispatcher"]["abandoned_threads"] == 0)
        assert worker.status()["dispatcher"]["cancels"] == 3
    finally:
        worker.stop()
        operator.dispose()

    for task_uuid, name in ((task, "sync"), (task, "async"), (other, "alone")):
        row = step_row(sqlite_db, task_uuid, name)
        assert (row.state, row.error["error_type"], row.results) == ("cancelled", "cancelled", None)
    assert "of the step" in step_row(sqlite_db, other, "alone").error["message"]
    # The cancelled task stays cancelled; the task of the step cancelled alone has nothing
    # else to run: error.
    with sqlite_db.read() as conn:
        states = dict(conn.execute(select(tasks.c.task_uuid, tasks.c.state)).all())
    assert (states[task], states[other]) == ("cancelled", "error")
