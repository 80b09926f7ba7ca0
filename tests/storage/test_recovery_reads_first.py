"""Lost-claim recovery reads first and writes only when there is something to recover.

Every worker runs recovery every second. A write transaction opened for nothing is not free:
on SQLite it takes the database's one write lock, which every commit of every worker then
waits for. These tests drive the real CompletionProcessor actor, tick by tick as the
watchdog does, on a database that counts the write transactions opened through it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pykka
import pytest
from sqlalchemy import Connection, select, update

from duplex.actors.completion_processor import CompletionProcessor, CompletionProcessorProxy
from duplex.actors.event_publisher import DomainEventPublisher
from duplex.clock import Timer, utcnow
from duplex.commit.buffer import CommitBuffer
from duplex.commit.retry import RetryPolicy
from duplex.errors import WORKER_LOST
from duplex.messages import ClaimedStep
from duplex.settings import DatabaseSettings
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.models import workers, workflow_step_transitions, workflow_steps
from duplex.storage.submission import create_task
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import parse_template
from tests.storage.support import add_worker

ME = "recoverer"
TICKS = 5
TEMPLATE = 'name = "wide"\n' + "".join(
    f'[[steps]]\nname = "s{i}"\nhandler = "t.s"\nmax_attempts = 3\n' for i in range(4)
)


class CountingDatabase(Database):
    """A Database that counts the write transactions opened through it."""

    def __init__(self, settings: DatabaseSettings) -> None:
        super().__init__(settings)
        self.writes = 0

    @contextmanager
    def write(self) -> Iterator[Connection]:
        self.writes += 1
        with super().write() as conn:
            yield conn


@pytest.fixture
def counting(db: Database) -> Iterator[CountingDatabase]:
    """A second engine on the test's migrated database (SQLite and PostgreSQL)."""
    counted = CountingDatabase(DatabaseSettings(url=db.url, busy_timeout_ms=10_000))
    yield counted
    counted.dispose()


@pytest.fixture
def recovery(counting: CountingDatabase) -> Iterator[CompletionProcessorProxy]:
    """The CompletionProcessor of worker ``ME``; only recovery uses its database."""
    timer = Timer()
    publisher = DomainEventPublisher.start(SubscriberRegistry(), buffer_size=100)
    completion = CompletionProcessor.start(
        counting,
        publisher.proxy(),
        timer,
        buffer=CommitBuffer(10),
        policy=RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=60_000, jitter=0.0),
        claim_timeout_s=30,
        worker_id=ME,
    )
    try:
        yield CompletionProcessorProxy.of(completion)
    finally:
        completion.stop()
        publisher.stop()
        timer.stop()


def tick(recovery: CompletionProcessorProxy) -> int:
    """One recovery tick, as the watchdog sends it; return how many attempts it recovered."""
    recovered: int = recovery.recover_lost_claims().get(timeout=30)
    return recovered


def claim(db: Database, worker_id: str, limit: int) -> list[ClaimedStep]:
    with db.write() as conn:
        return claim_ready_steps(
            conn, worker_id=worker_id, namespaces=("default",), limit=limit, now=utcnow()
        )


def states(db: Database) -> dict[str, tuple[str, str | None, Any]]:
    with db.read() as conn:
        rows = conn.execute(
            select(
                workflow_steps.c.step_uuid,
                workflow_steps.c.state,
                workflow_steps.c.claimed_by,
                workflow_steps.c.error,
            )
        ).all()
    return {row.step_uuid: (row.state, row.claimed_by, row.error) for row in rows}


def lost_transitions(db: Database) -> list[tuple[str, int, str | None]]:
    t = workflow_step_transitions
    with db.read() as conn:
        rows = conn.execute(
            select(t.c.step_uuid, t.c.attempt, t.c.worker_id).where(
                t.c.from_state == "in_progress", t.c.reason == WORKER_LOST
            )
        ).all()
    return [(row.step_uuid, row.attempt, row.worker_id) for row in rows]


def test_recovery_writes_only_when_a_worker_is_dead_and_recovers_once(
    db: Database, counting: CountingDatabase, recovery: CompletionProcessorProxy
) -> None:
    now = utcnow()
    with db.write() as conn:
        create_task(conn, parse_template(TEMPLATE), {}, now=now)
    for worker_id in (ME, "alive", "doomed"):
        add_worker(db, worker_id, now)
    mine = claim(db, ME, 1)
    alive = claim(db, "alive", 1)
    doomed = claim(db, "doomed", 2)
    assert len(mine) == len(alive) == 1
    assert len(doomed) == 2

    # Running attempts everywhere, no worker dead: ticks read and never write.
    for _ in range(TICKS):
        assert tick(recovery) == 0
    assert counting.writes == 0

    # "doomed" stops heart-beating: the next tick writes once and recovers its attempts.
    with db.write() as conn:
        conn.execute(
            update(workers)
            .where(workers.c.worker_id == "doomed")
            .values(heartbeat_at=now - timedelta(hours=1))
        )
    assert tick(recovery) == 2
    assert counting.writes == 1
    for _ in range(TICKS):
        assert tick(recovery) == 0
    assert counting.writes == 1

    after = states(db)
    for step in doomed:
        state, _, error = after[step.step_uuid]
        assert state == "waiting_for_retry"
        assert error["error_type"] == WORKER_LOST
    assert sorted(lost_transitions(db)) == sorted((s.step_uuid, 1, "doomed") for s in doomed)
    # Its own claim and a live worker's claim are never touched.
    for step, owner in ((mine[0], ME), (alive[0], "alive")):
        assert after[step.step_uuid][:2] == ("in_progress", owner)


def test_a_tick_with_nothing_to_recover_does_not_wait_for_the_sqlite_write_lock(
    sqlite_db: Database,
) -> None:
    path = sqlite_db.engine.url.database
    assert path is not None
    counted = CountingDatabase(DatabaseSettings(url=sqlite_db.url, busy_timeout_ms=10_000))
    timer = Timer()
    publisher = DomainEventPublisher.start(SubscriberRegistry(), buffer_size=100)
    completion: pykka.ActorRef[CompletionProcessor] = CompletionProcessor.start(
        counted,
        publisher.proxy(),
        timer,
        buffer=CommitBuffer(10),
        policy=RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=60_000, jitter=0.0),
        claim_timeout_s=30,
        worker_id=ME,
    )
    # Another process's commit in progress: it holds the one write lock.
    committer = sqlite3.connect(path, isolation_level=None)
    try:
        committer.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        assert tick(CompletionProcessorProxy.of(completion)) == 0
        elapsed = time.monotonic() - started
        committer.execute("ROLLBACK")
    finally:
        committer.close()
        completion.stop()
        publisher.stop()
        timer.stop()
        counted.dispose()
    # A write would have waited for the lock for up to busy_timeout (10 s), then failed.
    assert elapsed < 5, f"the tick waited {elapsed:.1f}s for the write lock"
    assert counted.writes == 0
