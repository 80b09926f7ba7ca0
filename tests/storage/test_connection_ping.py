"""PostgreSQL connections are pinged at checkout only after they sat idle in the pool, when the
database is opened as ``duplex run`` opens it (``ping_after_idle_s``); at every checkout
otherwise.

A transaction on a connection used a moment ago goes straight to its statements (a ping was
a round trip more on every hop of a chain); one idle for longer is pinged, and replaced
without a word when its backend is gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from duplex.errors import StorageError
from duplex.settings import DatabaseSettings
from duplex.storage import db as db_module
from duplex.storage.db import WORKER_PING_AFTER_IDLE_S, Database
from duplex.storage.listen import libpq_url


class Clock:
    """The pool's idle clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(db_module, "_clock", clock)
    return clock


@pytest.fixture
def opened(postgres_db: Database) -> Iterator[Callable[[float], tuple[Database, list[int]]]]:
    """Open ``postgres_db``'s database with one pooled connection and the given idle time;
    count the engine's pings."""
    opened: list[Database] = []

    def open_with(idle_s: float) -> tuple[Database, list[int]]:
        db = Database(DatabaseSettings(url=postgres_db.url, pool_size=1), ping_after_idle_s=idle_s)
        opened.append(db)
        pings: list[int] = []
        real = db.engine.dialect.do_ping

        def counted(dbapi_connection: Any) -> bool:
            pings.append(1)
            return real(dbapi_connection)

        db.engine.dialect.do_ping = counted  # type: ignore[method-assign]
        return db, pings

    yield open_with
    for db in opened:
        db.dispose()


def backend_pid(db: Database) -> int:
    with db.read() as conn:
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def terminate(db: Database, pid: int) -> None:
    with psycopg.connect(libpq_url(db.url), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        # Gone once the server no longer lists it: the next use cannot race the exit.
        deadline = time.monotonic() + 10
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone():
            assert time.monotonic() < deadline, f"backend {pid} still there"
            time.sleep(0.01)


def test_a_connection_used_within_the_idle_time_is_not_pinged(
    opened: Callable[[float], tuple[Database, list[int]]], clock: Clock
) -> None:
    db, pings = opened(WORKER_PING_AFTER_IDLE_S)
    first = backend_pid(db)  # a new connection: nothing to ping
    for _ in range(5):
        clock.now += WORKER_PING_AFTER_IDLE_S * 0.9
        assert backend_pid(db) == first
    assert pings == []
    clock.now += WORKER_PING_AFTER_IDLE_S  # idle for the whole time: pinged
    assert backend_pid(db) == first
    assert len(pings) == 1


def test_without_an_idle_time_every_checkout_is_pinged(
    opened: Callable[[float], tuple[Database, list[int]]],
) -> None:
    db, pings = opened(0.0)
    for _ in range(3):
        backend_pid(db)
    # The first checkout of a new connection pings too, as SQLAlchemy's pre-ping does.
    assert len(pings) == 3


def test_an_idle_connection_whose_backend_died_is_replaced_at_checkout(
    opened: Callable[[float], tuple[Database, list[int]]], clock: Clock
) -> None:
    db, pings = opened(WORKER_PING_AFTER_IDLE_S)
    first = backend_pid(db)
    terminate(db, first)
    clock.now += WORKER_PING_AFTER_IDLE_S
    # No error: the ping found the backend gone and the pool opened another connection.
    assert backend_pid(db) != first
    assert len(pings) == 1


def test_a_connection_that_died_while_hot_fails_once_as_transient(
    opened: Callable[[float], tuple[Database, list[int]]], clock: Clock
) -> None:
    db, pings = opened(WORKER_PING_AFTER_IDLE_S)
    first = backend_pid(db)
    terminate(db, first)
    with pytest.raises(StorageError) as raised, db.read() as conn:
        conn.exec_driver_sql("SELECT 1")
    assert raised.value.transient  # what the worker retries, as after any lost connection
    assert backend_pid(db) != first
    assert pings == []
