"""The relay when the database fails after the broker confirmed a batch, on a real SQLite file.

The fault is made, not hoped for: a connection of the test's own holds SQLite's writer lock
(``BEGIN IMMEDIATE``) while the relay publishes, so the relay reads and publishes (WAL readers
are not blocked) but its marking waits out ``busy_timeout`` and fails with "database is
locked". The broker is the in-memory one of ``relay_support``, which records every delivery.
The PostgreSQL case (a terminated connection) is in ``test_relay_faults_e2e.py``.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from duplex.events.relay import Relay
from duplex.events.relay_lock import RelayLock
from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.migrate import upgrade_to_head
from tests.events.support import claim_all, commit, outcome, pump_until_drained, submit
from tests.relay_support import FakeBroker, FakePublisher, relay_settings

BATCH = 5


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(
        DatabaseSettings(url=f"sqlite:///{tmp_path / 'duplex.db'}", busy_timeout_ms=50)
    )
    upgrade_to_head(database)
    yield database
    database.dispose()


class WriterLock:
    """SQLite's writer lock, held by a connection of the test's own."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None)

    def hold(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()


@pytest.fixture
def writer_lock(tmp_path: Path, db: Database) -> Iterator[WriterLock]:
    lock = WriterLock(tmp_path / "duplex.db")
    yield lock
    lock.close()


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{level} {message}")
    yield lines
    logger.remove(sink)


def committed_events(db: Database) -> int:
    """One task's 18 events: a batch is one run of ``BATCH`` of them."""
    submit(db, 6)
    commit(db, [outcome(step, 2) for step in claim_all(db)])  # 2 emitted + step.completed
    return 6 * 3


def relay_on(db: Database, broker: FakeBroker) -> Relay:
    return Relay(db, relay_settings(batch_size=BATCH), connect=lambda: FakePublisher(broker))


def test_a_refused_marking_is_recorded_before_anything_is_published_again(
    db: Database, writer_lock: WriterLock
) -> None:
    total = committed_events(db)
    broker = FakeBroker()
    relay = relay_on(db, broker)
    writer_lock.hold()
    relay.pump()
    assert len(broker.delivered) == BATCH, "the batch is confirmed before the marking fails"
    for _ in range(3):  # the database still refuses: nothing more goes out
        relay.pump()
    assert len(broker.delivered) == BATCH
    assert relay.stats.published == 0
    writer_lock.release()
    pump_until_drained(relay, db)
    relay.close()
    counts = Counter(m.message_id for m in broker.delivered)
    assert len(counts) == total
    assert max(counts.values()) == 1, "an event confirmed before the fault was published again"
    assert relay.stats.published == total
    arrivals = broker.first_arrivals()
    assert arrivals == {task: list(range(1, len(seqs) + 1)) for task, seqs in arrivals.items()}


def test_a_relay_stopped_while_the_marking_fails_leaves_one_batch_to_publish_again(
    db: Database, writer_lock: WriterLock, log_lines: list[str]
) -> None:
    """The one copy a database fault can cause with one relay: it stops before it could mark."""
    total = committed_events(db)
    broker = FakeBroker()
    first = relay_on(db, broker)
    writer_lock.hold()
    first.pump()
    first.close()  # tries once more to mark, in vain, and says what follows
    assert any(f"stopping with {BATCH} confirmed event(s) unmarked" in x for x in log_lines)
    writer_lock.release()
    second = relay_on(db, broker)
    pump_until_drained(second, db)
    second.close()
    counts = Counter(m.message_id for m in broker.delivered)
    assert len(counts) == total
    assert sum(counts.values()) - total == BATCH, "exactly the unmarked batch is published again"
    assert max(counts.values()) == 2


def test_relays_reaching_one_sqlite_file_through_a_symlink_share_one_lock(tmp_path: Path) -> None:
    real = tmp_path / "duplex.db"
    real.touch()
    (tmp_path / "link.db").symlink_to(real)
    direct = Database(DatabaseSettings(url=f"sqlite:///{real}"))
    linked = Database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'link.db'}"))
    first, second = RelayLock(direct), RelayLock(linked)
    try:
        assert first.try_acquire()
        assert not second.try_acquire(), "two relays would publish from one file at once"
        first.release()
        assert second.try_acquire()
    finally:
        first.release()
        second.release()
        direct.dispose()
        linked.dispose()
