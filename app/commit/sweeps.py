"""The watchdog's timed sweeps on the commit path: task deadlines, waits and sleeps whose
time is up, and this worker's running attempts that an operator cancelled (a read only: the
Dispatcher cancels them). Each reads first, and writes only when it found something: the sweep
runs every ``worker.deadline_sweep_interval_ms`` on every worker, and on SQLite a write
transaction with nothing to write would still make every commit of every worker wait for it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from loguru import logger

from duplex.errors import StorageError
from duplex.storage.cancels import RunningCancel, find_cancelled_attempts
from duplex.storage.db import Database

_T = TypeVar("_T")


def sweep(
    db: Database,
    what: str,
    find: Callable[..., list[str]],
    act: Callable[..., _T],
    *,
    now: datetime,
    worker_id: str,
) -> _T | None:
    """``find(conn, now=)`` in a read; if it found anything, ``act(conn, found, now=,
    worker_id=)`` in a write transaction. None when nothing was due or the database failed
    (logged: the next round tries again)."""
    try:
        with db.read() as conn:
            due = find(conn, now=now)
        if not due:
            return None
        # ``act`` locks the tasks and checks each row again: another worker may have raced.
        with db.write() as conn:
            return act(conn, due, now=now, worker_id=worker_id)
    except StorageError as exc:
        logger.warning("the sweep of {} failed: {}", what, exc)
        return None


def find_cancels(db: Database, *, worker_id: str) -> list[RunningCancel]:
    """Return ``worker_id``'s running attempts whose task or step an operator cancelled (empty
    when the database failed: logged, the next round tries again)."""
    try:
        with db.read() as conn:
            return find_cancelled_attempts(conn, me=worker_id)
    except StorageError as exc:
        logger.warning("the sweep of cancelled attempts failed: {}", exc)
        return []
