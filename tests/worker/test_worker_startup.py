"""The embedded Worker's start: its registration is safe to retry, and it is never left
half-started.

``duplex run`` retries the registration (its COMMIT may have gone through unheard), so it
must be idempotent; a start that fails half-way must stop what it started and leave a worker
that cannot serve (its row says stopped); a stop asked for while the worker starts must keep
the intake from ever claiming.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pykka
import pytest
from sqlalchemy import Connection, select

from duplex.actors.event_system import EventSystem
from duplex.actors.handler_worker import HandlerWorker
from duplex.clock import utcnow
from duplex.handlers import HandlerRegistry
from duplex.messages import Status
from duplex.storage.db import Database
from duplex.storage.models import workers, workflow_step_transitions, workflow_steps
from duplex.storage.submission import create_task
from duplex.templates import parse_template
from duplex.worker.wiring import Worker
from tests.conftest import make_settings


def make_worker(db: Database) -> Worker:
    return Worker(
        make_settings(str(db.url), event_system={"polling_interval_ms": 20}),
        db,
        registry=HandlerRegistry(),
    )


def worker_rows(db: Database) -> list[tuple[str, bool]]:
    with db.read() as conn:
        rows = conn.execute(select(workers.c.worker_id, workers.c.stopped_at.is_not(None)))
        return [(worker_id, bool(stopped)) for worker_id, stopped in rows]


def test_registering_again_keeps_one_row(db: Database) -> None:
    worker = make_worker(db)
    worker.register()
    worker.register()  # a retry after a COMMIT that went through unheard
    assert worker_rows(db) == [(worker.worker_id, False)]
    worker.stop()
    assert worker_rows(db) == [(worker.worker_id, True)]


def test_a_start_that_fails_half_way_leaves_nothing_running(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert pykka.ActorRegistry.get_all() == []

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot start the intake")

    def slow_to_start(self: HandlerWorker) -> None:
        # The handler actors are still starting when the start fails: the moment a loaded
        # machine makes, when their threads have not yet run when they are told to stop.
        time.sleep(0.3)

    # The last actor to start fails: every other one is running by then.
    monkeypatch.setattr(EventSystem, "start", refuse)
    monkeypatch.setattr(HandlerWorker, "on_start", slow_to_start)
    worker = make_worker(sqlite_db)
    with pytest.raises(RuntimeError, match="cannot start the intake"):
        worker.start()
    assert pykka.ActorRegistry.get_all() == []
    assert worker.actors is None
    assert worker_rows(sqlite_db) == [(worker.worker_id, True)]
    # Its row says stopped, so others would recover its claims: it must never serve again.
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="create a new Worker"):
        worker.start()
    assert pykka.ActorRegistry.get_all() == []
    assert worker_rows(sqlite_db) == [(worker.worker_id, True)]
    assert worker.stop() == {}


def test_a_registration_interrupted_after_its_commit_is_still_marked_stopped(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = Database.write

    @contextmanager
    def write_then_interrupt(self: Database) -> Iterator[Connection]:
        with real_write(self) as conn:
            yield conn
        raise KeyboardInterrupt  # a stop signal right after the COMMIT

    worker = make_worker(sqlite_db)
    monkeypatch.setattr(Database, "write", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        worker.register()
    monkeypatch.undo()
    assert worker_rows(sqlite_db) == [(worker.worker_id, False)]
    worker.stop()
    assert worker_rows(sqlite_db) == [(worker.worker_id, True)]


def test_a_stop_asked_for_while_starting_never_begins_the_intake(sqlite_db: Database) -> None:
    template = parse_template('name = "t"\n[[steps]]\nname = "a"\nhandler = "h"\n')
    with sqlite_db.write() as conn:
        create_task(conn, template, {}, now=utcnow())
    worker = make_worker(sqlite_db)
    worker.request_stop()  # the signal came while the worker started
    actors = worker.start()
    try:
        # Barriers down the flow: had the intake begun, its command would be queued ahead of
        # each of these answers, and its claim ahead of the executor's count.
        actors.event_system.stats().get(timeout=10)
        actors.command_processor.handle(Status()).get(timeout=10)
        assert actors.step_executor.claimed_total.get(timeout=10) == 0
    finally:
        worker.stop()
    with sqlite_db.read() as conn:
        rows = conn.execute(select(workflow_steps.c.state, workflow_steps.c.attempts)).all()
    assert [tuple(row) for row in rows] == [("enqueued", 0)]
    with sqlite_db.read() as conn:
        # Not claimed and handed back either: no state change since its submission.
        changes = conn.execute(
            select(workflow_step_transitions.c.from_state, workflow_step_transitions.c.to_state)
        ).all()
    assert [tuple(change) for change in changes] == [(None, "enqueued")]
