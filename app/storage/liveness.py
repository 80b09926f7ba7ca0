"""The liveness rule, as a plain function: is a worker recorded in SQL alive or presumed dead?

The same rule the recovery uses (``duplex.storage.recovery``): a worker is presumed dead when it
recorded its stop, when its heartbeat is older than ``event_system.claim_timeout_s``, or, on
this host, when its process no longer exists.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from duplex.storage.queries import all_workers
from duplex.storage.recovery import process_exists


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
    process_alive: Callable[[int], bool] = process_exists,
) -> Liveness:
    """Apply the liveness rule to one ``workers`` row."""
    if stopped_at is not None:
        return Liveness(False, "stopped", "recorded its stop")
    age = (now - heartbeat_at).total_seconds()
    if age > claim_timeout_s:
        return Liveness(
            False, "presumed dead", f"no heartbeat for {age:.0f}s (timeout {claim_timeout_s:g}s)"
        )
    if hostname == this_host and not process_alive(pid):
        return Liveness(False, "presumed dead", f"process {pid} is gone")
    return Liveness(True, "alive", "heart-beating")


def judged_workers(
    conn: Connection, *, claim_timeout_s: float, now: datetime, limit: int = 100
) -> list[tuple[dict[str, Any], Liveness]]:
    """The workers recorded in SQL, most recent heartbeat first, each with the rule's verdict."""
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
            ),
        )
        for row in all_workers(conn, limit=limit)
    ]
