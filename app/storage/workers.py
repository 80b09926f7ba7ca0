"""The ``workers`` table: one row per worker process, its heartbeat and its last stats."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, update

from duplex.storage.models import workers


def register_worker(
    conn: Connection, worker_id: str, *, hostname: str, pid: int, now: datetime
) -> None:
    """Record a starting worker (its host and pid are what same-host recovery checks).

    Safe to retry: when an earlier try's COMMIT went through unheard, its row is refreshed
    rather than inserted twice (a worker id is this process's alone).
    """
    values = {"hostname": hostname, "pid": pid, "started_at": now, "heartbeat_at": now}
    refreshed = conn.execute(
        update(workers)
        .where(workers.c.worker_id == worker_id)
        .values(**values, stopped_at=None, stats={})
    )
    if refreshed.rowcount == 0:
        conn.execute(insert(workers).values(worker_id=worker_id, **values, stats={}))


def record_heartbeat(
    conn: Connection, worker_id: str, *, now: datetime, stats: dict[str, Any]
) -> None:
    """Say the worker is alive, with its current counters."""
    conn.execute(
        update(workers)
        .where(workers.c.worker_id == worker_id)
        .values(heartbeat_at=now, stats=stats)
    )


def mark_worker_stopped(
    conn: Connection, worker_id: str, *, now: datetime, stats: dict[str, Any]
) -> None:
    """Record the worker's stop: from now on any claim it still holds is recovered at once."""
    conn.execute(
        update(workers)
        .where(workers.c.worker_id == worker_id)
        .values(stopped_at=now, heartbeat_at=now, stats=stats)
    )
