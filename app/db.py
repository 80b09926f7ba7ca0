"""Engines and transactions: the one place that talks to the database driver.

SQLite runs in WAL mode with a busy timeout, and write transactions open with
``BEGIN IMMEDIATE``: a deferred transaction that reads and then writes fails at once with
"database is locked" under WAL instead of waiting. Driver errors become ``StorageError``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    ProgrammingError,
    SQLAlchemyError,
)

from app.errors import ConfigurationError, StorageError
from app.settings import DatabaseSettings

_WRITE = "duplex_write"


class Database:
    """An engine plus the two kinds of transaction Duplex uses: read and write."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self.url = settings.url
        self.engine = create_database_engine(settings)
        self.dialect = self.engine.dialect.name
        # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in
        # growing steps (the busy handler) instead of being woken. Queue this process's writers
        # on a lock instead; other processes still meet busy_timeout.
        self._write_lock: threading.Lock | None = threading.Lock() if self.is_sqlite else None

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """Open a write transaction (``BEGIN IMMEDIATE`` on SQLite); commit on success."""
        if self._write_lock is None:
            with self._transaction(write=True) as conn:
                yield conn
            return
        with self._write_lock, self._transaction(write=True) as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """Open a read-only transaction."""
        with self._transaction(write=False) as conn:
            yield conn

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(**{_WRITE: write})
                with conn.begin():
                    yield conn
        except SQLAlchemyError as exc:
            # The database refused the data itself, or the statement could not even be built
            # from it: retrying the same data cannot help.
            refused = isinstance(exc, (DataError, IntegrityError, ProgrammingError)) or not (
                isinstance(exc, DBAPIError)
            )
            raise StorageError(
                f"database error: {_first_line(exc)}", transient=not refused
            ) from exc

    def dispose(self) -> None:
        self.engine.dispose()


def create_database_engine(settings: DatabaseSettings) -> Engine:
    """Create the engine for ``settings.url`` with Duplex's connection setup."""
    try:
        url = make_url(settings.url)
    except ArgumentError:
        raise ConfigurationError(f"database.url: not a database URL: {settings.url!r}") from None
    if url.get_backend_name() == "postgresql" and url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    kwargs: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {
            "timeout": settings.busy_timeout_ms / 1000,
            "check_same_thread": False,
        }
    else:
        kwargs["pool_size"] = settings.pool_size
        kwargs["pool_pre_ping"] = True
    if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        # Without it libpq waits for a host that drops packets as long as the kernel keeps
        # retrying: a claim, a command or a dashboard page would hang instead of failing.
        kwargs["connect_args"] = {"connect_timeout": settings.connect_timeout_s}
    try:
        engine = create_engine(url, **kwargs)
    except (ArgumentError, ImportError) as exc:
        raise ConfigurationError(f"database.url: {_first_line(exc)}") from None
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, settings.busy_timeout_ms)
    return engine


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below emit BEGIN instead of the driver.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        # NORMAL is durable against process crashes in WAL mode; only power loss can
        # roll back the last commits.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(_WRITE, True)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
