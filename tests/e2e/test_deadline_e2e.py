"""Task deadlines end to end, with a real worker (its actors on a SQLite file).

A task with ``max_duration = "5s"``: its first step blocks until its ``ctx.cancelled`` is
set, its second waits on the first. At the deadline the worker running the first cancels it
(``task_deadline_exceeded``, not retried) and the second is cancelled, each with the reason in
its transition row; the task is cancelled and ``task.deadline_exceeded`` is announced. Nothing
else could end the first step: its own timeout is the default 30 s, and the test's bounds
are far below it.

A task that finishes before its deadline is untouched, even by a sweep run after it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from duplex import Client
from duplex.clock import utcnow
from duplex.errors import TASK_DEADLINE_EXCEEDED
from duplex.handlers import HandlerRegistry, StepContext
from duplex.messages import DomainEvent
from duplex.storage.db import Database
from duplex.storage.models import tasks, workflow_step_transitions, workflow_steps
from duplex.storage.submission import create_task
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import parse_template
from tests.actors.support import running_worker
from tests.conftest import sqlite_database, wait_until

pytestmark = pytest.mark.e2e

WAIT_S = 20.0  # far below the step's own 30 s timeout, far above the 5 s deadline

BLOCKING = """
name = "deadline_blocking"
# Long enough that the running worker claims the first step before it, on a loaded machine
# too (a step claimed after it never starts: the last test here).
max_duration = "5s"
[[steps]]
name = "block"
handler = "dl.block"
[[steps]]
name = "after"
handler = "dl.quick"
depends_on = ["block"]
"""

QUICK = """
name = "deadline_quick"
# Two no-op steps finish far within it, on a loaded machine too.
max_duration = "3s"
[[steps]]
name = "one"
handler = "dl.quick"
[[steps]]
name = "two"
handler = "dl.quick"
depends_on = ["one"]
"""


class Handlers:
    """The handlers, and what they saw."""

    def __init__(self) -> None:
        self.registry = HandlerRegistry()
        self.saw_cancel = threading.Event()
        self.released = threading.Event()  # set in teardown: no thread outlives the test
        self.registry.register("dl.block", self.block)
        self.registry.register("dl.quick", lambda ctx: {"ok": True})

    def block(self, ctx: StepContext) -> dict[str, Any]:
        if ctx.cancelled.wait(WAIT_S * 2):
            self.saw_cancel.set()
        self.released.wait(WAIT_S * 2)
        return {"finished": True}


@pytest.fixture
def db(tmp_path: Path) -> Any:
    database = sqlite_database(tmp_path / "deadline.db")
    yield database
    database.dispose()


def steps(db: Database, task: str) -> dict[str, Any]:
    with db.read() as conn:
        rows = conn.execute(select(workflow_steps).where(workflow_steps.c.task_uuid == task))
        return {row.name: row for row in rows}


def transitions(db: Database, step_uuid: str) -> Sequence[Any]:
    with db.read() as conn:
        return conn.execute(
            select(workflow_step_transitions)
            .where(workflow_step_transitions.c.step_uuid == step_uuid)
            .order_by(workflow_step_transitions.c.id)
        ).all()


def task_state(db: Database, task: str) -> str:
    with db.read() as conn:
        return str(conn.execute(select(tasks.c.state).where(tasks.c.task_uuid == task)).scalar())


def test_a_task_past_its_deadline_is_cancelled_running_and_waiting(db: Database) -> None:
    handlers = Handlers()
    subscribers = SubscriberRegistry()
    announced: list[DomainEvent] = []
    subscribers.add("task.deadline_exceeded", announced.append)
    with running_worker(
        db,
        2,
        handlers.registry,
        subscribers=subscribers,
        worker_settings={"deadline_sweep_interval_ms": 50},
    ):
        try:
            with Client(db) as client:
                task = client.submit(parse_template(BLOCKING), {})
            assert handlers.saw_cancel.wait(WAIT_S), "the running attempt was never cancelled"
            assert wait_until(lambda: steps(db, task)["block"].state == "error", WAIT_S), steps(
                db, task
            )["block"].state
            assert wait_until(lambda: bool(announced), WAIT_S)
        finally:
            handlers.released.set()
    found = steps(db, task)
    block, after = found["block"], found["after"]
    assert block.error["error_type"] == TASK_DEADLINE_EXCEEDED
    assert block.error["retryable"] is False
    assert block.attempts == 1  # not retried
    assert after.state == "cancelled"
    assert after.error["error_type"] == TASK_DEADLINE_EXCEEDED
    assert task_state(db, task) == "cancelled"

    block_moves = [(t.from_state, t.to_state, t.reason) for t in transitions(db, block.step_uuid)]
    assert block_moves[-1] == ("in_progress", "error", TASK_DEADLINE_EXCEEDED)
    (last,) = transitions(db, after.step_uuid)[-1:]
    assert (last.from_state, last.to_state) == ("pending", "cancelled")
    assert last.reason.startswith(f"{TASK_DEADLINE_EXCEEDED}: ")
    # The deadline is the submission time + 5 s, and nothing ended before it.
    with db.read() as conn:
        created, deadline = conn.execute(
            select(tasks.c.created_at, tasks.c.deadline_at).where(tasks.c.task_uuid == task)
        ).one()
    assert deadline - created == timedelta(seconds=5)
    ended = transitions(db, block.step_uuid)[-1].created_at
    assert ended >= deadline
    assert last.created_at >= deadline
    assert [event.task_uuid for event in announced] == [task]
    assert announced[0].payload["cancelled_steps"] == ["after"]


def test_a_task_that_finishes_before_its_deadline_is_untouched(db: Database) -> None:
    handlers = Handlers()
    with running_worker(
        db, 2, handlers.registry, worker_settings={"deadline_sweep_interval_ms": 50}
    ) as (worker, _):
        with Client(db) as client:
            task = client.submit(parse_template(QUICK), {})
        assert wait_until(lambda: task_state(db, task) == "complete", WAIT_S)
        with db.read() as conn:
            deadline = conn.execute(
                select(tasks.c.deadline_at).where(tasks.c.task_uuid == task)
            ).scalar_one()
        # Make the moment happen: a sweep after the deadline has passed.
        assert wait_until(lambda: utcnow() > deadline, WAIT_S)
        assert worker.actors is not None
        assert worker.actors.completion.sweep_deadlines().get(timeout=WAIT_S) == 0
    found = steps(db, task)
    assert {name: row.state for name, row in found.items()} == {
        "one": "complete",
        "two": "complete",
    }
    assert all(row.error is None for row in found.values())
    assert task_state(db, task) == "complete"


def test_the_periodic_sweep_expires_a_task_no_worker_runs(db: Database) -> None:
    # Its namespace is served by no worker: only the sweep (the watchdog's, every 50 ms) can
    # cancel its steps. Submitted an hour ago with a one-second deadline.
    template = parse_template(
        'name = "unserved"\nnamespace = "nobody"\nmax_duration = "1s"\n'
        '[[steps]]\nname = "a"\nhandler = "dl.quick"\n'
        '[[steps]]\nname = "b"\nhandler = "dl.quick"\ndepends_on = ["a"]\n'
    )
    with db.write() as conn:
        task = create_task(conn, template, {}, now=utcnow() - timedelta(hours=1))
    handlers = Handlers()
    with running_worker(
        db, 1, handlers.registry, worker_settings={"deadline_sweep_interval_ms": 50}
    ):
        assert wait_until(lambda: task_state(db, task) == "cancelled", WAIT_S)
    assert {name: row.state for name, row in steps(db, task).items()} == {
        "a": "cancelled",
        "b": "cancelled",
    }


def test_a_step_claimed_after_its_deadline_never_starts(db: Database) -> None:
    calls: list[str] = []
    registry = HandlerRegistry()
    registry.register("dl.record", lambda ctx: calls.append(ctx.step_name))
    template = parse_template(
        'name = "late"\nmax_duration = "1s"\n[[steps]]\nname = "a"\nhandler = "dl.record"\n'
    )
    with db.write() as conn:
        task = create_task(conn, template, {}, now=utcnow() - timedelta(hours=1))
    # A sweep interval of an hour: the claim, not the sweep, meets this task first.
    with running_worker(db, 1, registry, worker_settings={"deadline_sweep_interval_ms": 3_600_000}):
        assert wait_until(lambda: steps(db, task)["a"].state == "error", WAIT_S)
    (step,) = steps(db, task).values()
    assert calls == []
    assert step.error["error_type"] == TASK_DEADLINE_EXCEEDED
    assert "before this attempt could start" in step.error["message"]
    assert task_state(db, task) == "cancelled"
