"""Which database failures are transient: real errors from real SQLite and PostgreSQL.

``StorageError.transient`` decides whether a caller tries the same work again (start-up, the
commit path). Only a failure that can pass may be transient: a syntax error or a missing
table retried would be retried forever.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection

from duplex.errors import SchemaNotReadyError, StorageError
from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.listen import libpq_url
from duplex.storage.schema import ensure_schema_ready
from tests.conftest import POSTGRES_URL, require_postgres


def failure(db: Database, work: Callable[[Connection], Any], *, write: bool = True) -> StorageError:
    """Run ``work`` in a transaction of ``db``; return the StorageError it must raise."""
    transaction = db.write() if write else db.read()
    with pytest.raises(StorageError) as raised, transaction as conn:
        work(conn)
    return raised.value


# --- SQLite -------------------------------------------------------------------------------


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Iterator[Database]:
    db = Database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'x.db'}", busy_timeout_ms=0))
    with db.write() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    yield db
    db.dispose()


@pytest.mark.parametrize(
    "sql",
    [
        "SELEC 1",  # syntax error
        "SELECT * FROM no_such_table",
        "SELECT no_such_column FROM t",
        "INSERT INTO t (id) VALUES (1), (1)",  # constraint
    ],
)
def test_sqlite_errors_that_fail_every_time_are_not_transient(
    sqlite_file: Database, sql: str
) -> None:
    error = failure(sqlite_file, lambda conn: conn.exec_driver_sql(sql))
    assert not error.transient, error


def test_sqlite_database_is_locked_is_transient(sqlite_file: Database, tmp_path: Path) -> None:
    other = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        error = failure(sqlite_file, lambda conn: conn.exec_driver_sql("INSERT INTO t VALUES (2)"))
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert "database is locked" in str(error)
    assert error.transient


def test_sqlite_file_that_cannot_be_opened_is_not_transient(tmp_path: Path) -> None:
    db = Database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}"))
    try:
        error = failure(db, lambda conn: None, write=False)
    finally:
        db.dispose()
    assert "unable to open database file" in str(error)
    assert not error.transient


def test_a_database_without_the_schema_is_not_transient(sqlite_file: Database) -> None:
    with pytest.raises(SchemaNotReadyError) as raised:
        ensure_schema_ready(sqlite_file)
    assert not raised.value.transient


# --- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture
def pg(postgres_db: Database) -> Iterator[tuple[Database, psycopg.Connection[Any]]]:
    """A database with a table ``t`` (ids 1 and 2), and a second connection of the test's."""
    with postgres_db.write() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER DEFAULT 0)")
        conn.exec_driver_sql("INSERT INTO t (id) VALUES (1), (2)")
    other = psycopg.connect(libpq_url(postgres_db.url))
    try:
        yield postgres_db, other
    finally:
        other.close()


@pytest.mark.parametrize(
    ("sql", "sqlstate"),
    [
        ("SELEC 1", "42601"),  # syntax error
        ("SELECT * FROM no_such_table", "42P01"),
        ("SELECT 1 / 0", "22012"),  # refused data
        ("INSERT INTO t (id) VALUES (1)", "23505"),  # unique violation
        # Both OperationalError in the driver, which once made them transient:
        # program limit exceeded (an index row too large) ...
        (
            "CREATE TABLE u (s text); CREATE INDEX ON u (s);"
            " INSERT INTO u SELECT string_agg(md5(random()::text), '')"
            " FROM generate_series(1, 300)",
            "54000",
        ),
        # ... and object not in prerequisite state.
        ("CREATE SEQUENCE q; SELECT currval('q')", "55000"),
    ],
)
def test_postgresql_errors_that_fail_every_time_are_not_transient(
    pg: tuple[Database, psycopg.Connection[Any]], sql: str, sqlstate: str
) -> None:
    db, _ = pg
    error = failure(db, lambda conn: conn.exec_driver_sql(sql))
    assert _sqlstate(error) == sqlstate
    assert not error.transient, error


def _sqlstate(error: StorageError) -> str | None:
    return getattr(getattr(error.__cause__, "orig", None), "sqlstate", None)


def test_a_terminated_backend_is_transient(pg: tuple[Database, psycopg.Connection[Any]]) -> None:
    db, other = pg

    def terminated(conn: Connection) -> None:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        other.execute("SELECT pg_terminate_backend(%s)", [pid])
        other.commit()
        conn.exec_driver_sql("SELECT 1")

    error = failure(db, terminated)
    assert "terminating connection due to administrator command" in str(error)
    assert error.transient


def test_a_lock_timeout_is_transient(pg: tuple[Database, psycopg.Connection[Any]]) -> None:
    db, other = pg
    other.execute("LOCK TABLE t IN EXCLUSIVE MODE")

    def wait_for_lock(conn: Connection) -> None:
        conn.exec_driver_sql("SET LOCAL lock_timeout = '50ms'")
        conn.exec_driver_sql("UPDATE t SET n = n + 1")

    error = failure(db, wait_for_lock)
    other.rollback()
    assert _sqlstate(error) == "55P03"
    assert error.transient


def test_a_statement_timeout_is_transient(pg: tuple[Database, psycopg.Connection[Any]]) -> None:
    db, _ = pg

    def slow(conn: Connection) -> None:
        conn.exec_driver_sql("SET LOCAL statement_timeout = '50ms'")
        conn.exec_driver_sql("SELECT pg_sleep(5)")

    error = failure(db, slow)
    assert _sqlstate(error) == "57014"
    assert error.transient


def test_a_serialization_failure_is_transient(
    pg: tuple[Database, psycopg.Connection[Any]],
) -> None:
    db, other = pg

    def update_after_a_concurrent_update(conn: Connection) -> None:
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.exec_driver_sql("SELECT n FROM t WHERE id = 1")  # takes the snapshot
        other.execute("UPDATE t SET n = n + 1 WHERE id = 1")
        other.commit()
        conn.exec_driver_sql("UPDATE t SET n = n + 1 WHERE id = 1")

    error = failure(db, update_after_a_concurrent_update)
    assert _sqlstate(error) == "40001"
    assert error.transient


def test_a_deadlock_is_transient(pg: tuple[Database, psycopg.Connection[Any]]) -> None:
    db, other = pg
    # The side whose deadlock check runs first finds the cycle and is the one aborted.
    other.execute("SET deadlock_timeout = '10s'")
    other.execute("SELECT 1 FROM t WHERE id = 1 FOR UPDATE")
    waiting = threading.Event()
    errors: list[StorageError] = []

    def lock_in_the_other_order() -> None:
        def work(conn: Connection) -> None:
            conn.exec_driver_sql("SET LOCAL deadlock_timeout = '100ms'")
            conn.exec_driver_sql("SELECT 1 FROM t WHERE id = 2 FOR UPDATE")
            waiting.set()
            conn.exec_driver_sql("SELECT 1 FROM t WHERE id = 1 FOR UPDATE")

        try:
            with db.write() as conn:
                work(conn)
        except StorageError as exc:
            errors.append(exc)

    thread = threading.Thread(target=lock_in_the_other_order)
    thread.start()
    assert waiting.wait(10)
    # Blocks on row 2 until the thread's transaction is aborted as the deadlock's victim.
    other.execute("SELECT 1 FROM t WHERE id = 2 FOR UPDATE")
    other.rollback()
    thread.join(10)
    (error,) = errors
    assert _sqlstate(error) == "40P01"
    assert error.transient


def _pg_url(**parts: str) -> str:
    """The test server's URL with some of its parts replaced."""
    from sqlalchemy.engine import make_url

    return make_url(POSTGRES_URL).set(**parts).render_as_string(hide_password=False)  # type: ignore[arg-type]


def _connect_failure(url: str) -> StorageError:
    db = Database(DatabaseSettings(url=url, connect_timeout_s=2))
    try:
        return failure(db, lambda conn: None, write=False)
    finally:
        db.dispose()


def test_a_refused_connection_is_transient() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = _connect_failure(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test")
    assert "Connection refused" in str(error)
    assert error.transient


def test_a_server_out_of_connection_slots_is_transient() -> None:
    require_postgres()
    role = f"duplex_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_url(POSTGRES_URL), autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0')
        try:
            error = _connect_failure(_pg_url(username=role))
        finally:
            admin.execute(f'DROP ROLE "{role}"')
    assert "too many connections" in str(error)
    assert error.transient


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({"database": "duplex_no_such_database"}, "does not exist"),
        ({"username": "duplex_no_such_role"}, "does not exist"),
    ],
)
def test_a_connection_the_server_turns_down_for_good_is_not_transient(
    parts: dict[str, str], message: str
) -> None:
    require_postgres()
    error = _connect_failure(_pg_url(**parts))
    assert message in str(error)
    assert not error.transient
