"""The liveness rule, as a plain function: is a worker recorded in SQL alive or presumed dead?

The same rule the recovery uses (``app.storage.recovery``): a worker is presumed dead when it
recorded its stop, when its heartbeat is older than ``event_system.claim_timeout_s``, or, on
this host, when its process no longer exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from app.storage.recovery import process_exists


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
