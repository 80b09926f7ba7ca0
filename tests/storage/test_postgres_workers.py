"""PostgreSQL: several workers share one queue; event-driven intake; locked migrations."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import func, select

from duplex.clock import utcnow
from duplex.handlers import HandlerRegistry, StepContext
from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.migrate import head_revision, upgrade_to_head
from duplex.storage.models import workflow_step_transitions, workflow_steps
from duplex.storage.schema import current_revision
from duplex.storage.submission import create_task
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import parse_template
from duplex.worker.wiring import Worker
from tests.conftest import (
    make_settings,
    wait_until,
)

pytestmark = pytest.mark.postgres


def fan_template(n: int) -> str:
    steps = "".join(f'[[steps]]\nname = "s{i}"\nhandler = "t.count"\n' for i in range(n))
    return f'name = "fan"\n{steps}'


def test_two_workers_share_the_queue_and_run_each_step_once(pg_url: str) -> None:
    db = Database(DatabaseSettings(url=pg_url))
    upgrade_to_head(db)
    runs: Counter[str] = Counter()
    lock = threading.Lock()
    registry = HandlerRegistry()
    # The handlers wait until both workers hold claims: the first one to start cannot run
    # the whole queue before the second has claimed anything, however fast it is.
    both_claimed = threading.Event()

    def count(ctx: StepContext) -> None:
        assert both_claimed.wait(30), "the second worker never claimed anything"
        with lock:
            runs[ctx.step_uuid] += 1

    registry.register("t.count", count)
    with db.write() as conn:
        create_task(conn, parse_template(fan_template(200)), {}, now=utcnow())
    settings = make_settings(pg_url, worker={"max_concurrent_handlers": 4})
    workers = [
        Worker(settings, Database(DatabaseSettings(url=pg_url)), registry=registry)
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()

    def claimants_now() -> int:
        with db.read() as conn:
            return int(
                conn.execute(
                    select(func.count(func.distinct(workflow_steps.c.claimed_by))).where(
                        workflow_steps.c.state == "in_progress"
                    )
                ).scalar_one()
            )

    try:
        assert wait_until(lambda: claimants_now() == 2, 30), "both workers should claim work"
        both_claimed.set()
        assert wait_until(lambda: sum(runs.values()) >= 200, 60)
    finally:
        both_claimed.set()
        for worker in workers:
            worker.stop()
    assert len(runs) == 200
    assert set(runs.values()) == {1}
    with db.read() as conn:
        claimants = conn.execute(
            select(workflow_step_transitions.c.worker_id, func.count())
            .where(workflow_step_transitions.c.to_state == "in_progress")
            .group_by(workflow_step_transitions.c.worker_id)
        ).all()
        states = set(conn.execute(select(workflow_steps.c.state)).scalars())
    assert states == {"complete"}
    assert len(claimants) == 2, "both workers should have claimed work"
    db.dispose()


def test_event_driven_intake_picks_up_a_submission_without_polling(pg_url: str) -> None:
    db = Database(DatabaseSettings(url=pg_url))
    upgrade_to_head(db)
    registry, subscribers = HandlerRegistry(), SubscriberRegistry()
    ran: list[str] = []
    first, second = threading.Event(), threading.Event()

    def record(ctx: StepContext) -> None:
        ran.append(ctx.task_uuid)
        (second if first.is_set() else first).set()

    registry.register("t.count", record)
    settings = make_settings(
        pg_url,
        event_system={"deployment_mode": "event_driven", "polling_interval_ms": 3_600_000},
    )
    with db.write() as conn:
        create_task(conn, parse_template(fan_template(1)), {}, now=utcnow())
    worker = Worker(settings, db, registry=registry, subscribers=subscribers)
    worker.start()
    try:
        # The first task is found by the look the listener takes once LISTEN is in effect;
        # after it ran, nothing polls, so only a NOTIFY can bring the second one in.
        assert first.wait(10)
        other = Database(DatabaseSettings(url=pg_url))
        with other.write() as conn:
            create_task(conn, parse_template(fan_template(1)), {}, now=utcnow())
        other.dispose()
        assert second.wait(10), "a NOTIFY should have woken the worker"
    finally:
        worker.stop()
        db.dispose()
    assert len(set(ran)) == 2


def test_workers_starting_together_migrate_once(pg_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def migrate() -> None:
        db = Database(DatabaseSettings(url=pg_url))
        try:
            barrier.wait()
            upgrade_to_head(db)
        except BaseException as exc:
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    db = Database(DatabaseSettings(url=pg_url))
    assert current_revision(db) == head_revision()
    db.dispose()
