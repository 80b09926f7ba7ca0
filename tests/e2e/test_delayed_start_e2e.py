"""Delayed starts through a real worker on SQLite: submitted with ``run_at``/``delay`` a few
hundred milliseconds ahead, no step starts early, as the transition rows and the handlers'
own clocks show; steps submitted with no delay meanwhile run at once.

The test waits only for the outcome (every task complete); the times come from the rows.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from duplex.client import Client
from duplex.clock import utcnow
from duplex.handlers import HandlerRegistry, StepContext
from duplex.storage.db import Database
from duplex.storage.models import tasks, workflow_step_transitions, workflow_steps
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import parse_template
from duplex.worker.wiring import Worker
from tests.conftest import make_settings, sqlite_database, wait_until

CHAIN = parse_template(
    'name = "later"\n[[steps]]\nname = "a"\nhandler = "t.stamp"\n'
    '[[steps]]\nname = "b"\nhandler = "t.stamp"\ndepends_on = ["a"]\n'
)


def test_delayed_steps_never_start_early(tmp_path: Path) -> None:
    db = sqlite_database(tmp_path / "d.db")
    registry = HandlerRegistry()
    started: dict[tuple[str, str], datetime] = {}
    lock = threading.Lock()

    def stamp(ctx: StepContext) -> dict[str, object]:
        with lock:
            started[(ctx.task_uuid, ctx.step_name)] = utcnow()
        return {}

    registry.register("t.stamp", stamp)
    worker = Worker(
        make_settings(
            str(db.url),
            worker={"max_concurrent_handlers": 4},
            event_system={"polling_interval_ms": 20},
        ),
        db,
        registry=registry,
        subscribers=SubscriberRegistry(),
    )
    worker.start()
    try:
        with Client(db) as client:
            t0 = utcnow()
            run_at = {
                client.submit(CHAIN, run_at=t0 + timedelta(seconds=2)): t0 + timedelta(seconds=2),
            }
            now = utcnow()
            for task in client.submit_many(CHAIN, [{}, {}], delay=timedelta(milliseconds=2500)):
                run_at[task] = now + timedelta(milliseconds=2500)
            at_once = client.submit(CHAIN)
        assert wait_until(lambda: _all_complete(db), timeout_s=30)
    finally:
        worker.stop()

    claims = _claim_times(db)
    for task, not_before in run_at.items():
        # The transition row is written by the claim, the stamp by the handler itself; the
        # submission stored its roots' start a little after ``not_before`` was computed.
        assert claims[(task, "a")] >= not_before
        assert started[(task, "a")] >= not_before
        assert claims[(task, "b")] >= claims[(task, "a")]
    # Not held up by the delayed ones.
    assert claims[(at_once, "a")] < min(run_at.values())


def _all_complete(db: Database) -> bool:
    with db.read() as conn:
        states = set(conn.execute(select(tasks.c.state)).scalars())
    return states == {"complete"}


def _claim_times(db: Database) -> dict[tuple[str, str], datetime]:
    t, ws = workflow_step_transitions, workflow_steps
    with db.read() as conn:
        rows = conn.execute(
            select(ws.c.task_uuid, ws.c.name, t.c.created_at)
            .join(ws, ws.c.step_uuid == t.c.step_uuid)
            .where(t.c.to_state == "in_progress")
        )
        return {(row.task_uuid, row.name): row.created_at for row in rows}
