"""A connection lost under a DirectStatement is handled as SQLAlchemy's own execution handles
it: a transient error, the connection invalidated, and the pool's older connections with it
(what killed one, a server restart, killed the others)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from sqlalchemy import bindparam, select

from duplex.errors import StorageError
from duplex.storage.db import Database
from duplex.storage.direct import DirectStatement
from duplex.storage.listen import libpq_url
from duplex.storage.models import tasks

_TASK = DirectStatement(select(tasks.c.state).where(tasks.c.task_uuid == bindparam("t")))


def _backend_pid(db: Database) -> int:
    with db.read() as conn:
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def _read_after_its_backend_is_terminated(
    db: Database, admin: psycopg.Connection[Any], seen: dict[str, bool]
) -> None:
    with db.read() as conn:
        pid = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])  # waits for its exit
        try:
            _TASK.rows(conn, {"t": "none"})
        finally:
            seen["invalidated"] = conn.invalidated


def test_a_terminated_backend_is_transient_and_the_pool_starts_afresh(
    postgres_db: Database,
) -> None:
    # Two connections in the pool (one held while the other is checked out): one is lost,
    # the other is as old as it.
    with postgres_db.read() as held:
        pooled = {int(held.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())}
        pooled.add(_backend_pid(postgres_db))
    assert len(pooled) == 2
    seen: dict[str, bool] = {}
    with (
        psycopg.connect(libpq_url(postgres_db.url), autocommit=True) as admin,
        pytest.raises(StorageError) as failed,
    ):
        _read_after_its_backend_is_terminated(postgres_db, admin, seen)
    assert seen["invalidated"]
    assert failed.value.transient
    assert "terminating connection due to administrator command" in str(failed.value)
    # Neither the lost connection nor the other one is handed out again.
    with postgres_db.read() as first, postgres_db.read() as second:
        pids: set[Any] = {
            first.exec_driver_sql("SELECT pg_backend_pid()").scalar_one(),
            second.exec_driver_sql("SELECT pg_backend_pid()").scalar_one(),
        }
        assert _TASK.rows(first, {"t": "none"}) == []
    assert not pids & pooled
