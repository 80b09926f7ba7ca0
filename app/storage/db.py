"""Engines and transactions: the one place that talks to the database driver.

SQLite runs in WAL mode with a busy timeout, and write transactions open with
``BEGIN IMMEDIATE``: a deferred transaction that reads and then writes fails at once with
"database is locked" under WAL instead of waiting. Driver errors become ``StorageError``,
marked transient only when the same statement can succeed later (``is_transient``).
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    InvalidatePoolError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from duplex.errors import ConfigurationError, StorageError
from duplex.settings import DatabaseSettings
from duplex.storage.direct import run_at_driver

_WRITE = "duplex_write"
# How long ``duplex run`` lets a pooled PostgreSQL connection sit idle before it pings it at
# checkout. One used a moment ago is alive but for a rare mishap (a terminated backend, a
# restart), which its next statement reports as a transient error, and every path of the
# worker retries those; a ping on every checkout cost each transaction a round trip (a hop
# of a chain is one transaction). Other programs (the Client, the CLI, the dashboard) ping
# at every checkout: they show such an error to their user instead of retrying it.
WORKER_PING_AFTER_IDLE_S = 1.0
_IDLE_SINCE = "duplex_idle_since"
_clock = time.monotonic  # what the idle time is measured with


class Database:
    """An engine plus the two kinds of transaction Duplex uses: read and write.

    ``ping_after_idle_s``: on PostgreSQL, ping a pooled connection at checkout only after it
    sat idle this long (0: at every checkout).
    """

    def __init__(self, settings: DatabaseSettings, *, ping_after_idle_s: float = 0.0) -> None:
        self.url = settings.url
        self.engine = create_database_engine(settings, ping_after_idle_s=ping_after_idle_s)
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
            raise StorageError(
                f"database error: {_first_line(exc)}",
                transient=is_transient(exc),
                refused=refuses_data(exc),
            ) from exc

    def dispose(self) -> None:
        self.engine.dispose()


# SQLite's primary result codes (the low byte of an extended code) of conditions that pass:
# another writer holds the lock (BUSY, LOCKED), or the system ran short for a moment (NOMEM,
# IOERR, FULL, PROTOCOL). SQLITE_ERROR (a syntax error, a missing table), READONLY, CORRUPT,
# CANTOPEN and the rest fail the same way every time.
_SQLITE_TRANSIENT_CODES = frozenset({5, 6, 7, 10, 13, 15})
_SQLITE_LOCKED = re.compile(r"database (?:table )?is locked|database is busy")
# PostgreSQL SQLSTATE classes and codes of conditions that pass: connection exceptions,
# insufficient resources, serialization failures and deadlocks, a lock or statement timeout,
# the server shutting down, crashing or starting up, a session closed for idling.
_PG_TRANSIENT_CLASSES = frozenset({"08", "53"})
_PG_REFUSED_DATA_CLASSES = frozenset({"22", "23", "54"})
_PG_TRANSIENT_CODES = frozenset(
    {"40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03", "57P05", "25P03"}
)
# A connection refused by the server itself (libpq reports these without a SQLSTATE): the
# settings are wrong, and trying again cannot help.
_PG_REFUSALS = re.compile(
    r"does not exist|authentication failed|no pg_hba\.conf entry|permission denied"
    r"|SSL (?:is )?(?:required|not supported)|unsupported frontend protocol",
    re.IGNORECASE,
)


def is_transient(exc: SQLAlchemyError) -> bool:
    """Return whether the failure can pass, so that the same work may be tried again.

    Transient: a lost or refused connection, a full pool, a lock held elsewhere, a deadlock
    or serialization failure, a server short of resources or restarting. Everything else (a
    syntax error, a missing table, refused data, a misconfigured connection) fails the same
    way on every try, and a caller retrying it would retry forever.
    """
    if isinstance(exc, (PoolTimeoutError, DisconnectionError)):
        return True
    if not isinstance(exc, DBAPIError):
        return False  # the statement could not even be built: a bug or bad data
    if exc.connection_invalidated:
        return True  # SQLAlchemy recognised a lost connection
    orig = exc.orig
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        if code is None:  # not from the library itself: only its message tells
            return _SQLITE_LOCKED.search(str(orig)) is not None
        return code & 0xFF in _SQLITE_TRANSIENT_CODES
    if type(orig).__module__.startswith("psycopg"):
        sqlstate: str | None = getattr(orig, "sqlstate", None)
        if sqlstate is None:
            # No answer from the server: the connection failed or was lost, unless the server
            # turned the connection down for a reason that stays.
            return isinstance(exc, OperationalError) and not _PG_REFUSALS.search(str(orig))
        return sqlstate[:2] in _PG_TRANSIENT_CLASSES or sqlstate in _PG_TRANSIENT_CODES
    return False


def refuses_data(exc: SQLAlchemyError) -> bool:
    """Return whether the database refused the data itself (see ``StorageError.refused``).

    The driver's data and integrity errors, PostgreSQL's SQLSTATE classes 22 (data), 23
    (integrity) and 54 (a value over a limit, such as an index row too large), a statement
    that could not be built from its values, and the driver's programming errors (sqlite3
    raises one for a value it cannot bind).
    """
    if isinstance(exc, (DataError, IntegrityError, ProgrammingError)):
        return True
    if not isinstance(exc, DBAPIError):
        return not isinstance(exc, (PoolTimeoutError, DisconnectionError))
    sqlstate: str | None = getattr(exc.orig, "sqlstate", None)
    return sqlstate is not None and sqlstate[:2] in _PG_REFUSED_DATA_CLASSES


def create_database_engine(settings: DatabaseSettings, *, ping_after_idle_s: float = 0.0) -> Engine:
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
        # The connection checked in last goes out first: the busy ones stay warm (not pinged).
        kwargs["pool_use_lifo"] = True
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
    else:
        _without_jit(engine)
        _ping_when_idle(engine, ping_after_idle_s)
    return engine


def _without_jit(engine: Engine) -> None:
    """Turn PostgreSQL's JIT compilation off on every connection of ``engine``.

    Duplex's statements are short and read by index. JIT compiles a statement whose cost
    estimate passes ``jit_above_cost``, and estimates of subqueries repeated per row grow
    with a table whatever the rows read: with a template paused, the claim order's read took
    19-28 ms a claim at 50,000 tasks, 0.2-0.3 ms without. Set on the session (not as a
    startup ``options``, which connection poolers such as PgBouncer refuse); a pooler that
    moves sessions between server connections may drop it, which costs time, never
    correctness.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET jit = off")
        dbapi_connection.commit()


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Ping a pooled connection at checkout once it sat ``idle_s`` in the pool. A dead one is
    replaced, with every connection older than it (SQLAlchemy retries the checkout)."""

    @event.listens_for(engine, "connect")
    def _on_connect(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = _clock()  # new: nothing to ping

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = _clock()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if idle_s > 0 and since is not None and _clock() - since < idle_s:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            # As ``pool_pre_ping`` does: what killed this one (a restart) killed the others.
            raise InvalidatePoolError(_first_line(exc)) from exc


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
        run_at_driver(conn, "BEGIN IMMEDIATE" if write else "BEGIN", ())


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
