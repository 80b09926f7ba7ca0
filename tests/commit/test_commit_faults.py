"""Fault injection on the completion path, and subscribers that misbehave.

Guarantee 2 (commit before announce) when the database fails: while result commits fail,
nothing about those results is announced; the results are kept and retried with backoff, and
after recovery every step is committed once and every event delivered once. Subscribers that
raise, block or cannot keep up never affect steps; overflow is dropped, counted, and the
events stay in ``domain_events``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, select

from duplex.actors.completion_processor import CommitObserver
from duplex.clock import utcnow
from duplex.handlers import HandlerRegistry, StepContext
from duplex.messages import DomainEvent
from duplex.storage.db import Database
from duplex.storage.models import domain_events, workflow_step_transitions, workflow_steps
from duplex.storage.results import CommitReport
from duplex.storage.submission import create_task
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import TaskTemplate
from duplex.worker import flow
from duplex.worker.wiring import Worker
from tests.conftest import make_settings, open_work, sqlite_database, wait_until

STEPS = 6


def submit_steps(db: Database, count: int) -> str:
    steps = [{"name": f"s{i}", "handler": "t.emit"} for i in range(count)]
    template = TaskTemplate.model_validate({"name": "faults", "steps": steps})
    with db.write() as conn:
        return create_task(conn, template, {}, now=utcnow())


def emitting_registry(ran: list[str]) -> HandlerRegistry:
    registry = HandlerRegistry()

    def emit(ctx: StepContext) -> dict[str, str]:
        ran.append(ctx.step_name)
        ctx.emit("test.emitted", {"step": ctx.step_name})
        return {"step": ctx.step_name}

    registry.register("t.emit", emit)
    return registry


@contextmanager
def running_worker(
    db: Database,
    registry: HandlerRegistry,
    subscribers: SubscriberRegistry,
    *,
    observer: CommitObserver | None = None,
    **sections: dict[str, Any],
) -> Iterator[tuple[Worker, dict[str, Any]]]:
    sections = {
        "worker": {"max_concurrent_handlers": 2},
        "event_system": {"polling_interval_ms": 20},
        **sections,
    }
    worker = Worker(
        make_settings(str(db.url), **sections),
        db,
        registry=registry,
        subscribers=subscribers,
        observer=observer,
    )
    final: dict[str, Any] = {}
    worker.start()
    try:
        yield worker, final
    finally:
        final.update(worker.stop())


class CommitFaults:
    """Make transactions that write ``domain_events`` fail, at the INSERT or at COMMIT.

    Only result commits write domain events, so claims keep working and handlers keep
    running while every result commit fails. The driver's own error type is raised where
    the driver would raise it, so SQLAlchemy and ``Database`` handle it as a real failure.
    """

    def __init__(
        self,
        db: Database,
        where: str,
        monkeypatch: pytest.MonkeyPatch,
        error: str = "database is locked",
    ) -> None:
        self.active = True
        self._error = error
        self.failed_at: list[float] = []
        self._where = where
        self._writing_events: set[int] = set()
        event.listen(db.engine, "before_cursor_execute", self._before_execute)
        do_commit = db.engine.dialect.do_commit

        def failing_commit(dbapi_connection: Any) -> None:
            raw = getattr(dbapi_connection, "dbapi_connection", dbapi_connection)
            marked = id(raw) in self._writing_events
            self._writing_events.discard(id(raw))
            if marked and self._where == "commit" and self.active:
                self._fail()
            do_commit(dbapi_connection)

        monkeypatch.setattr(db.engine.dialect, "do_commit", failing_commit)

    def _before_execute(
        self, conn: Any, cursor: Any, statement: str, *args: Any, **kwargs: Any
    ) -> None:
        if not statement.lstrip().upper().startswith("INSERT INTO DOMAIN_EVENTS"):
            return
        self._writing_events.add(id(cursor.connection))
        if self._where == "insert" and self.active:
            self._fail()

    def _fail(self) -> None:
        self.failed_at.append(time.monotonic())
        raise sqlite3.OperationalError(f"{self._error} (injected fault)")


# A lock passes; a database that turned read-only (a failover, a remount) does not pass by
# itself, but it refused no result: the batch is kept and retried, never recorded as
# result_unstorable.
@pytest.mark.parametrize("error", ["database is locked", "attempt to write a readonly database"])
@pytest.mark.parametrize("where", ["insert", "commit"])
def test_failed_commits_announce_nothing_then_commit_and_deliver_exactly_once(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch, where: str, error: str
) -> None:
    ran: list[str] = []
    delivered: list[DomainEvent] = []
    reports: list[CommitReport] = []
    subscribers = SubscriberRegistry()
    subscribers.add("*", delivered.append)
    faults = CommitFaults(sqlite_db, where, monkeypatch, error)

    def observer(report: CommitReport) -> None:
        reports.append(report)

    with running_worker(sqlite_db, emitting_registry(ran), subscribers, observer=observer) as (
        worker,
        final,
    ):
        task = submit_steps(sqlite_db, STEPS)
        worker.nudge()

        def failing_with_everything_buffered() -> bool:
            stats = worker.status()["completion"]
            return len(ran) == STEPS and stats["buffered"] == STEPS and len(faults.failed_at) >= 3

        assert wait_until(failing_with_everything_buffered)
        stats = worker.status()["completion"]
        assert stats["committed"] == 0
        assert stats["commit_failing"] is True
        assert stats["commit_errors"] == len(faults.failed_at)
        assert reports == []
        assert delivered == []
        with sqlite_db.read() as conn:
            assert conn.execute(select(domain_events)).all() == []
            states = conn.execute(select(workflow_steps.c.state)).scalars().all()
        assert states == ["in_progress"] * STEPS
        # Retried with backoff (lower bounds only: a busy machine makes the gaps longer).
        gaps = [b - a for a, b in zip(faults.failed_at, faults.failed_at[1:], strict=False)]
        assert all(gap >= 0.9 * 0.05 * 2**i for i, gap in enumerate(gaps[:3])), gaps

        faults.active = False
        assert wait_until(lambda: open_work(sqlite_db) == 0)

    assert sorted(ran) == sorted(f"s{i}" for i in range(STEPS))  # each handler ran once
    assert final["completion"]["committed"] == STEPS
    assert final["completion"]["commit_failing"] is False
    with sqlite_db.read() as conn:
        rows = conn.execute(select(workflow_steps)).all()
        results = Counter(
            conn.execute(
                select(workflow_step_transitions.c.step_uuid).where(
                    workflow_step_transitions.c.from_state == "in_progress"
                )
            ).scalars()
        )
        stored = conn.execute(select(domain_events)).all()
    assert {(r.state, r.attempts) for r in rows} == {("complete", 1)}
    assert all(r.task_uuid == task for r in rows)
    assert results == Counter({r.step_uuid: 1 for r in rows})
    assert Counter(e.name for e in stored) == {"test.emitted": STEPS, "step.completed": STEPS}
    applied = Counter(o.step.step_uuid for report in reports for o in report.applied)
    assert applied == Counter({r.step_uuid: 1 for r in rows})
    assert Counter(e.event_id for e in delivered) == Counter({e.event_id: 1 for e in stored})


def test_raising_and_slow_subscribers_never_affect_steps(sqlite_db: Database) -> None:
    ran: list[str] = []
    slow_seen: list[str] = []
    slow_entered, release_slow = threading.Event(), threading.Event()

    def raising(event: DomainEvent) -> None:
        raise RuntimeError(f"subscriber bug on {event.name}")

    def slow(event: DomainEvent) -> None:
        slow_entered.set()
        release_slow.wait(30)
        slow_seen.append(event.event_id)

    subscribers = SubscriberRegistry()
    subscribers.add("*", raising)
    subscribers.add("*", slow)
    with running_worker(sqlite_db, emitting_registry(ran), subscribers) as (worker, final):
        try:
            submit_steps(sqlite_db, STEPS)
            worker.nudge()
            assert slow_entered.wait(10)
            # Every step finishes while the delivery thread is stuck in the slow subscriber.
            assert wait_until(lambda: open_work(sqlite_db) == 0)
            assert not release_slow.is_set()
        finally:
            release_slow.set()
        assert wait_until(lambda: worker.status()["events"]["queued"] == 0)

    with sqlite_db.read() as conn:
        states = conn.execute(select(workflow_steps.c.state)).scalars().all()
        stored = conn.execute(select(domain_events.c.event_id)).scalars().all()
    assert states == ["complete"] * STEPS
    events = final["events"]
    assert events["dropped"] == 0
    assert events["published"] == events["delivered"] == len(stored) == 2 * STEPS
    # The raising subscriber failed on every event; the slow one after it still saw them all.
    assert events["subscriber_errors"] == len(stored)
    assert sorted(slow_seen) == sorted(stored)


def test_full_event_buffer_drops_and_counts_but_keeps_rows(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []
    seen: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def blocked(event: DomainEvent) -> None:
        entered.set()
        release.wait(30)
        seen.append(event.event_id)

    subscribers = SubscriberRegistry()
    subscribers.add("*", blocked)
    total = 2 * STEPS  # each step: its own event and step.completed
    with running_worker(
        sqlite_db, emitting_registry(ran), subscribers, domain_events={"buffer_size": 2}
    ) as (worker, final):
        try:
            submit_steps(sqlite_db, STEPS)
            worker.nudge()
            assert entered.wait(10)
            assert wait_until(lambda: open_work(sqlite_db) == 0)

            def all_accounted() -> bool:
                events = worker.status()["events"]
                return bool(events["published"] + events["dropped"] == total)

            assert wait_until(all_accounted)
            events = worker.status()["events"]
            # One event in the stuck subscriber, at most two queued; the rest were dropped.
            assert events["published"] <= 3
            assert events["dropped"] == total - events["published"] > 0
        except BaseException:
            release.set()
            raise
        # The subscriber is still stuck when the stop begins, and let go only when the stop
        # delivers the events: what it delivers then counts in the stop's figures.
        deliver = flow.deliver_events

        def deliver_after_release(actors: Any, deadline: float) -> None:
            release.set()
            deliver(actors, deadline)

        monkeypatch.setattr(flow, "deliver_events", deliver_after_release)

    with sqlite_db.read() as conn:
        stored = conn.execute(select(domain_events.c.event_id)).scalars().all()
        states = conn.execute(select(workflow_steps.c.state)).scalars().all()
    assert states == ["complete"] * STEPS
    assert len(stored) == total  # dropped from delivery, never from the table
    assert final["events"]["dropped"] == total - final["events"]["published"]
    assert final["events"]["delivered"] == final["events"]["published"] == len(seen)
    assert set(seen) <= set(stored)


@pytest.mark.postgres
def test_unstorable_result_does_not_block_other_results(postgres_db: Database) -> None:
    """Guarantee 6: a result the database rejects becomes a failure; others still commit."""
    registry = HandlerRegistry()
    registry.register("t.nul", lambda ctx: {"text": "a\x00b"})  # valid JSON, not for JSONB
    registry.register("t.emit", lambda ctx: {"step": ctx.step_name})
    with running_worker(
        postgres_db,
        registry,
        SubscriberRegistry(),
        worker={"max_concurrent_handlers": 2, "shutdown_timeout_ms": 0},
    ) as (worker, _):
        steps = [{"name": "nul", "handler": "t.nul"}, {"name": "fine", "handler": "t.emit"}]
        template = TaskTemplate.model_validate({"name": "poison", "steps": steps})
        with postgres_db.write() as conn:
            create_task(conn, template, {}, now=utcnow())
        worker.nudge()
        settled = wait_until(lambda: open_work(postgres_db) == 0, timeout_s=3)
        failing = worker.status()["completion"]["commit_failing"]
    with postgres_db.read() as conn:
        states = dict(conn.execute(select(workflow_steps.c.name, workflow_steps.c.state)).all())
    assert states == {"nul": "error", "fine": "complete"}
    assert settled
    assert not failing


@pytest.mark.postgres
def test_a_refused_outcome_is_isolated_and_recorded_as_unstorable(postgres_db: Database) -> None:
    """The database refuses one outcome of a batch (an event name over 255 characters).

    The batch is split, the refused outcome settles as ``result_unstorable`` and every other
    result of the batch still commits and is announced.
    """
    registry, subscribers = HandlerRegistry(), SubscriberRegistry()
    gate = threading.Event()

    def poison(ctx: StepContext) -> None:
        gate.wait(5)
        ctx.emit("x" * 300, {})

    def fine(ctx: StepContext) -> dict[str, str]:
        gate.wait(5)
        return {"step": ctx.step_name}

    registry.register("t.poison", poison)
    registry.register("t.fine", fine)
    delivered: list[str] = []
    subscribers.add("step.completed", lambda event: delivered.append(event.payload["step_name"]))
    with running_worker(
        postgres_db, registry, subscribers, worker={"max_concurrent_handlers": 4}
    ) as (worker, _):
        steps = [{"name": "poison", "handler": "t.poison"}] + [
            {"name": f"fine{i}", "handler": "t.fine"} for i in range(3)
        ]
        template = TaskTemplate.model_validate({"name": "refused", "steps": steps})
        with postgres_db.write() as conn:
            create_task(conn, template, {}, now=utcnow())
        worker.nudge()
        # Release all four together so their results share a commit batch.
        assert wait_until(lambda: worker.status()["dispatcher"]["running"] == 4, timeout_s=10)
        gate.set()
        assert wait_until(lambda: open_work(postgres_db) == 0, timeout_s=10)
        assert wait_until(lambda: len(delivered) == 3, timeout_s=5)
        assert not worker.status()["completion"]["commit_failing"]
    with postgres_db.read() as conn:
        rows = {
            row.name: row
            for row in conn.execute(
                select(workflow_steps.c.name, workflow_steps.c.state, workflow_steps.c.error)
            )
        }
    assert rows["poison"].state == "error"
    assert rows["poison"].error["error_type"] == "result_unstorable"
    assert {name: row.state for name, row in rows.items() if name != "poison"} == dict.fromkeys(
        ["fine0", "fine1", "fine2"], "complete"
    )
    assert sorted(delivered) == ["fine0", "fine1", "fine2"]


def test_stop_does_not_hang_on_a_stuck_subscriber_with_a_full_queue(tmp_path: Any) -> None:
    """A subscriber that never returns and a full delivery queue: stop still ends, and logs."""
    db = sqlite_database(tmp_path / "stuck.db")
    ran: list[str] = []
    stuck = threading.Event()  # never set: the subscriber blocks for good
    subscribers = SubscriberRegistry()
    subscribers.add("*", lambda event: stuck.wait())
    worker = Worker(
        make_settings(
            str(db.url),
            worker={"max_concurrent_handlers": 2, "shutdown_timeout_ms": 100},
            domain_events={"buffer_size": 2},
        ),
        db,
        registry=emitting_registry(ran),
        subscribers=subscribers,
    )
    worker.start()
    submit_steps(db, 4)
    worker.nudge()
    assert wait_until(lambda: open_work(db) == 0, timeout_s=15)
    finished = threading.Event()

    def stop() -> None:
        worker.stop()
        finished.set()

    threading.Thread(target=stop, daemon=True).start()
    assert finished.wait(60), "Worker.stop hung on the stuck subscriber"
    db.dispose()


def test_an_attempt_that_cannot_even_be_prepared_still_frees_its_slot(tmp_path: Any) -> None:
    """If Duplex itself fails before the handler runs, the step fails and the slot returns."""

    class BrokenRegistry(HandlerRegistry):
        def resolve(self, name: str) -> Any:
            if name == "t.broken":
                raise RuntimeError("registry exploded")
            return super().resolve(name)

    db = sqlite_database(tmp_path / "broken.db")
    ran: list[str] = []
    registry = BrokenRegistry()
    registry.register("t.emit", emitting_registry(ran).resolve("t.emit"))  # type: ignore[arg-type]
    steps = [{"name": "broken", "handler": "t.broken"}] + [
        {"name": f"s{i}", "handler": "t.emit"} for i in range(3)
    ]
    with db.write() as conn:
        create_task(
            conn, TaskTemplate.model_validate({"name": "b", "steps": steps}), {}, now=utcnow()
        )
    worker = Worker(
        make_settings(str(db.url), worker={"max_concurrent_handlers": 1}),
        db,
        registry=registry,
        subscribers=SubscriberRegistry(),
    )
    worker.start()
    try:
        assert wait_until(lambda: open_work(db) == 0, timeout_s=15)
        assert worker.status()["dispatcher"]["running"] == 0
    finally:
        worker.stop()
    with db.read() as conn:
        rows = {r.name: r for r in conn.execute(select(workflow_steps))}
    assert rows["broken"].state == "error"
    assert rows["broken"].error["error_type"] == "handler_aborted"
    assert all(rows[f"s{i}"].state == "complete" for i in range(3))
    db.dispose()
