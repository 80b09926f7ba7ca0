"""Shared fixtures: migrated databases (SQLite always, PostgreSQL when reachable), and the
owners of the processes tests start (``tests/processes.py``: nothing outlives its test).

PostgreSQL tests skip on a laptop without a server, but fail when ``CI`` is set.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from duplex.settings import DatabaseSettings, Settings
from duplex.storage.db import Database
from duplex.storage.migrate import upgrade_to_head
from duplex.storage.queries import count_open_work
from tests.processes import module_processes, owned_processes, session_processes

__all__ = ["module_processes", "owned_processes", "session_processes"]

# The test tools that assert, outside test modules: pytest rewrites their asserts too, so that a
# failing check explains itself as a test's own assert does.
pytest.register_assert_rewrite(
    "tests.actors.support",
    "tests.cli.support",
    "tests.dashboard.support",
    "tests.e2e.support",
    "tests.events.support",
    "tests.storage.support",
)

POSTGRES_URL = os.environ.get(
    "DUPLEX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout_s`` passes; return whether it held."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def open_work(db: Database, namespaces: tuple[str, ...] = ("default",)) -> int:
    """Count steps that could still run (enqueued, in progress, waiting for retry)."""
    with db.read() as conn:
        return count_open_work(conn, namespaces)


def make_settings(url: str, **sections: dict[str, Any]) -> Settings:
    """Build settings for a test without reading settings.toml or the environment's file."""
    return Settings(database={"url": url}, **sections)  # type: ignore[arg-type]


def sqlite_database(path: Path) -> Database:
    """Return a migrated SQLite database in ``path``."""
    db = Database(DatabaseSettings(url=f"sqlite:///{path}"))
    upgrade_to_head(db)
    return db


def postgres_available() -> bool:
    try:
        engine = create_engine(POSTGRES_URL)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


def require_postgres() -> None:
    """Skip without PostgreSQL, except in CI where a missing server is a failure."""
    if postgres_available():
        return
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI but {POSTGRES_URL} is not reachable")
    pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}")


def postgres_schema_url(schema: str) -> str:
    """Return the test server URL with ``schema`` first on the search path."""
    sep = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"


def create_postgres_schema() -> str:
    schema = f"duplex_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    return schema


def drop_postgres_schema(schema: str) -> None:
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    db = sqlite_database(tmp_path / "duplex.db")
    yield db
    db.dispose()


@pytest.fixture
def postgres_db() -> Iterator[Database]:
    """A migrated PostgreSQL database in a schema of its own, dropped afterwards."""
    require_postgres()
    schema = create_postgres_schema()
    db = Database(DatabaseSettings(url=postgres_schema_url(schema)))
    try:
        upgrade_to_head(db)
        yield db
    finally:
        db.dispose()
        drop_postgres_schema(schema)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of an empty PostgreSQL schema of its own, dropped afterwards."""
    require_postgres()
    schema = create_postgres_schema()
    try:
        yield postgres_schema_url(schema)
    finally:
        drop_postgres_schema(schema)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """Each storage test runs on both backends."""
    if request.param == "sqlite":
        database = sqlite_database(tmp_path / "duplex.db")
        yield database
        database.dispose()
    else:
        yield request.getfixturevalue("postgres_db")
