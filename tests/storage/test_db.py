"""Connecting: a PostgreSQL host that never answers fails in bounded time, as a StorageError;
PostgreSQL sessions run without JIT."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from duplex.errors import StorageError
from duplex.settings import DatabaseSettings
from duplex.storage.db import Database


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that completes the TCP handshake (the kernel's backlog) and never says a word,
    as a server behind a network that drops its replies looks to a client."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def _time_to_fail(settings: DatabaseSettings) -> tuple[float, BaseException | None]:
    """Open a read transaction in a thread; return how long it took and what it raised."""
    outcome: list[BaseException | None] = []

    def connect() -> None:
        db = Database(settings)
        try:
            with db.read():
                pass
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            db.dispose()

    started = time.monotonic()
    thread = threading.Thread(target=connect, daemon=True)  # a hung one must not block exit
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the connection attempt hung past 20 s"
    return time.monotonic() - started, outcome[0]


def test_a_postgresql_host_that_never_answers_fails_after_the_connect_timeout(
    silent_port: int,
) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{silent_port}/test"
    elapsed, error = _time_to_fail(DatabaseSettings(url=url, connect_timeout_s=2))
    assert isinstance(error, StorageError)
    assert error.transient  # the host may answer again: the caller's retry policy applies
    assert 1.5 <= elapsed < 10


def test_a_connect_timeout_in_the_url_wins_over_the_setting(silent_port: int) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{silent_port}/test?connect_timeout=2"
    elapsed, error = _time_to_fail(DatabaseSettings(url=url, connect_timeout_s=3600))
    assert isinstance(error, StorageError)
    assert 1.5 <= elapsed < 10


def test_the_connect_timeout_is_at_least_libpqs_minimum() -> None:
    with pytest.raises(ValueError, match="connect_timeout_s"):
        DatabaseSettings(connect_timeout_s=1)


def test_postgresql_connections_run_without_jit(postgres_db: Database) -> None:
    """Every pooled connection, the first and those opened later: JIT compiled the claim
    order's read at every claim once its cost estimate grew with the tasks table."""
    with postgres_db.read() as first, postgres_db.read() as second:
        settings = [conn.exec_driver_sql("SHOW jit").scalar_one() for conn in (first, second)]
    # A session setting, not a transaction's: it outlives the transactions before.
    with postgres_db.write() as conn:
        settings.append(conn.exec_driver_sql("SHOW jit").scalar_one())
    assert settings == ["off", "off", "off"]
