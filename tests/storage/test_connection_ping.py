"""PostgreSQL connections are pinged at checkout only after they sat idle in the pool.

A transaction on a connection used a moment ago goes straight to its statements (a ping was
a round trip more on every hop of a chain); one idle for ``PING_AFTER_IDLE_S`` is pinged,
and replaced without a word when its backend is gone.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from duplex.errors import StorageError
from duplex.storage import db as db_module
from duplex.storage.db import Database
from duplex.storage.listen import libpq_url


@pytest.fixture
def pings(postgres_db: Database, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the pings of ``postgres_db``'s engine."""
    dialect = postgres_db.engine.dialect
    count: list[int] = []
    real = dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        count.append(1)
        return real(dbapi_connection)

    monkeypatch.setattr(dialect, "do_ping", counted)
    return count


def backend_pid(db: Database) -> int:
    with db.read() as conn:
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def terminate(db: Database, pid: int) -> None:
    with psycopg.connect(libpq_url(db.url), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        # Gone once the server no longer lists it: the next use cannot race the exit.
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone():
            pass


def test_a_connection_used_a_moment_ago_is_not_pinged(
    postgres_db: Database, pings: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_S", 3600.0)
    for _ in range(5):
        backend_pid(postgres_db)
    assert pings == []
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_S", 0.0)
    for _ in range(3):
        backend_pid(postgres_db)
    assert len(pings) == 3


def test_an_idle_connection_whose_backend_died_is_replaced_at_checkout(
    postgres_db: Database, pings: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = backend_pid(postgres_db)
    terminate(postgres_db, first)
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_S", 0.0)  # as if idle for long
    # No error: the ping found the backend gone and the pool opened another connection.
    assert backend_pid(postgres_db) != first
    assert pings


def test_a_connection_that_died_while_hot_fails_once_as_transient(
    postgres_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_S", 3600.0)
    first = backend_pid(postgres_db)
    terminate(postgres_db, first)
    with pytest.raises(StorageError) as raised, postgres_db.read() as conn:
        conn.exec_driver_sql("SELECT 1")
    assert raised.value.transient  # what a caller retries, as after any lost connection
    assert backend_pid(postgres_db) != first
