"""The ``workers`` table: one row per worker process, and the liveness rule that reads it.

Writes: a worker registers, records where it takes wake-ups (SQLite), beats (with its last
stats) and records its stop. Whoever wakes workers reads their addresses (``wake_addresses``).

The liveness rule, the one place it is written: a worker is presumed dead when it recorded
its stop, when its heartbeat is older than ``event_system.claim_timeout_s``, or, on this host,
when its process is gone. Set-based readers select by its SQL half (``alive_in_sql``):
recovery, ``alive_workers`` for ``duplex status``, and ``wake_addresses``. Per-row readers
get a verdict with a reason (``judge``): ``duplex workers``, the dashboard, and
``alive_workers`` on the rows it selected. All share ``process_gone`` for the same-host sign.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, insert, select, update

from duplex.storage.models import workers

# --- writes ---------------------------------------------------------------------------------


def register_worker(
    conn: Connection, worker_id: str, *, hostname: str, pid: int, now: datetime
) -> None:
    """Record a starting worker (its host and pid are what same-host recovery checks).

    Safe to retry: when an earlier try's COMMIT went through unheard, its row is refreshed
    rather than inserted twice (a worker id is this process's alone). A refreshed row loses its
    wake address: the socket behind it belonged to an earlier run of that id.
    """
    values = {"hostname": hostname, "pid": pid, "started_at": now, "heartbeat_at": now}
    refreshed = conn.execute(
        update(workers)
        .where(workers.c.worker_id == worker_id)
        .values(**values, stopped_at=None, stats={}, wake_address=None)
    )
    if refreshed.rowcount == 0:
        conn.execute(insert(workers).values(worker_id=worker_id, **values, stats={}))


def record_wake_address(conn: Connection, worker_id: str, address: str) -> None:
    """Say where the worker takes wake-ups (``duplex.intake.wake``)."""
    conn.execute(
        update(workers).where(workers.c.worker_id == worker_id).values(wake_address=address)
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


def probe(conn: Connection) -> None:
    """Read the database at the least cost; raises when it cannot be read (health checks)."""
    # A real table, so SQLite reads the file rather than answering from nothing.
    conn.exec_driver_sql("SELECT count(*) FROM workers WHERE 1 = 0").scalar()


# --- the liveness rule ------------------------------------------------------------------------


def process_exists(pid: int) -> bool:
    """Return whether a process ``pid`` runs on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:
        # /proc/<pid>/stat: "pid (comm) state ..."; a killed, unreaped child is a zombie.
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


# When this process started using Duplex. A worker row with this process's own pid but an
# earlier start belongs to an earlier process that had the same pid (a container's PID 1
# restarted on the same host): it is dead, though the pid is alive.
PROCESS_STARTED_AT = datetime.now(UTC)


def heartbeat_cutoff(now: datetime, claim_timeout_s: float) -> datetime:
    """The oldest heartbeat a live worker may have."""
    return now - timedelta(seconds=claim_timeout_s)


def alive_in_sql(cutoff: datetime) -> ColumnElement[bool]:
    """The rule's SQL half, on ``workers`` rows: not stopped, and beat since ``cutoff``."""
    return and_(workers.c.stopped_at.is_(None), workers.c.heartbeat_at >= cutoff)


def process_gone(
    pid: int | None,
    started_at: datetime | None,
    *,
    alive: Callable[[int], bool] = process_exists,
) -> bool:
    """The rule's same-host half: whether the process of a worker row of this host is gone."""
    if pid is None:
        return False
    if pid == os.getpid():
        return started_at is not None and started_at < PROCESS_STARTED_AT
    return not alive(pid)


@dataclass(frozen=True)
class Liveness:
    """What the rule says about one worker, and why."""

    alive: bool
    state: str  # "alive", "stopped" or "presumed dead"
    why: str


def judge(
    *,
    hostname: str,
    pid: int,
    heartbeat_at: datetime,
    stopped_at: datetime | None,
    now: datetime,
    claim_timeout_s: float,
    this_host: str,
    started_at: datetime | None = None,
    process_alive: Callable[[int], bool] = process_exists,
) -> Liveness:
    """Apply the liveness rule to one ``workers`` row."""
    if stopped_at is not None:
        return Liveness(False, "stopped", "recorded its stop")
    if heartbeat_at < heartbeat_cutoff(now, claim_timeout_s):
        age = (now - heartbeat_at).total_seconds()
        return Liveness(
            False, "presumed dead", f"no heartbeat for {age:.0f}s (timeout {claim_timeout_s:g}s)"
        )
    if hostname == this_host and process_gone(pid, started_at, alive=process_alive):
        return Liveness(False, "presumed dead", f"process {pid} is gone")
    return Liveness(True, "alive", "heart-beating")


def all_workers(conn: Connection, *, limit: int = 100) -> list[dict[str, Any]]:
    """Return the workers recorded in SQL, most recent heartbeat first, with their stats."""
    rows = conn.execute(
        select(workers).order_by(workers.c.heartbeat_at.desc(), workers.c.worker_id).limit(limit)
    )
    return [dict(row._mapping) for row in rows]


def judged_workers(
    conn: Connection, *, claim_timeout_s: float, now: datetime, limit: int = 100
) -> list[tuple[dict[str, Any], Liveness]]:
    """The workers recorded in SQL, most recent heartbeat first, each with the rule's verdict."""
    return _judged(all_workers(conn, limit=limit), claim_timeout_s=claim_timeout_s, now=now)


def alive_workers(
    conn: Connection, *, claim_timeout_s: float, now: datetime
) -> list[tuple[dict[str, Any], Liveness]]:
    """Every worker the rule finds alive, most recent heartbeat first, each with its verdict.

    SQL picks the rows by the rule's SQL half, so no number of stopped or silent workers can
    crowd an alive one out; the verdict then drops this host's workers whose process is gone.
    """
    rows = conn.execute(
        select(workers)
        .where(alive_in_sql(heartbeat_cutoff(now, claim_timeout_s)))
        .order_by(workers.c.heartbeat_at.desc(), workers.c.worker_id)
    )
    judged = _judged([dict(row._mapping) for row in rows], claim_timeout_s=claim_timeout_s, now=now)
    return [(row, liveness) for row, liveness in judged if liveness.alive]


def _judged(
    rows: list[dict[str, Any]], *, claim_timeout_s: float, now: datetime
) -> list[tuple[dict[str, Any], Liveness]]:
    this_host = socket.gethostname()
    return [
        (
            row,
            judge(
                hostname=row["hostname"],
                pid=row["pid"],
                heartbeat_at=row["heartbeat_at"],
                stopped_at=row["stopped_at"],
                now=now,
                claim_timeout_s=claim_timeout_s,
                this_host=this_host,
                started_at=row["started_at"],
            ),
        )
        for row in rows
    ]


def dead_local_workers(
    conn: Connection,
    *,
    hostname: str,
    me: str,
    heartbeat_cutoff: datetime,
    alive: Callable[[int], bool] = process_exists,
) -> list[str]:
    """Return the ids of this host's workers that look alive in SQL but whose process is gone.

    Workers whose heartbeat already expired are dead by the SQL rule and not listed.
    """
    rows = conn.execute(
        select(workers.c.worker_id, workers.c.pid, workers.c.started_at).where(
            workers.c.hostname == hostname,
            workers.c.worker_id != me,
            alive_in_sql(heartbeat_cutoff),
        )
    )
    return sorted(
        worker_id
        for worker_id, pid, started_at in rows
        if process_gone(pid, started_at, alive=alive)
    )


def wake_addresses(conn: Connection, *, hostname: str, heartbeat_cutoff: datetime) -> list[str]:
    """Return the wake addresses of the workers of ``hostname`` that look alive in SQL.

    Only the rule's SQL half: a worker whose process is gone has no socket any more, and a
    datagram to it fails at once, which costs less than looking for its process.
    """
    rows = conn.execute(
        select(workers.c.wake_address)
        .where(
            workers.c.hostname == hostname,
            workers.c.wake_address.is_not(None),
            alive_in_sql(heartbeat_cutoff),
        )
        .order_by(workers.c.worker_id)
    )
    return [address for (address,) in rows]
