"""The ``workers`` table: one row per worker process, its heartbeat and its last stats."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, update

from app.models import workers


def register_worker(
    conn: Connection, worker_id: str, *, hostname: str, pid: int, now: datetime
) -> None:
    """Record a starting worker (its host and pid are what same-host recovery checks)."""
    conn.execute(
        insert(workers).values(
            worker_id=worker_id,
            hostname=hostname,
            pid=pid,
            started_at=now,
            heartbeat_at=now,
            stats={},
        )
    )


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
