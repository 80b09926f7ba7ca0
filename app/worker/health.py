"""Health: whether the worker can take work, and the details behind the answer.

Plain code, no threads: the worker gathers a ``HealthSnapshot`` (actor liveness, a database
probe, its own phase, the counters its actors keep) and ``readiness`` turns it into reasons
not to send it work. The HTTP endpoints only serialise what these return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Phase = Literal["starting", "running", "draining", "stopped"]


@dataclass(frozen=True)
class HealthSnapshot:
    """What the worker knows about itself at one instant."""

    worker_id: str
    version: str
    phase: Phase
    uptime_s: float
    # Actor class name -> alive (HandlerWorkers are counted in ``slots``, restarted by policy).
    actors: dict[str, bool]
    failure: str | None
    database_error: str | None
    slots: dict[str, int] | None = None
    commit: dict[str, Any] | None = None
    heartbeat_age_s: float | None = None
    heartbeat_interval_s: float = 5.0
    extra: dict[str, Any] = field(default_factory=dict)


def readiness(snapshot: HealthSnapshot) -> list[str]:
    """Return why the worker should not get work now; an empty list means ready.

    Ready means: the database answers, every actor is alive, and the worker is running
    (neither still starting nor draining).
    """
    reasons: list[str] = []
    if snapshot.phase != "running":
        reasons.append(f"worker is {snapshot.phase}")
    if snapshot.failure is not None:
        reasons.append(snapshot.failure)
    dead = sorted(name for name, alive in snapshot.actors.items() if not alive)
    if dead:
        reasons.append(f"actor(s) not alive: {', '.join(dead)}")
    if snapshot.database_error is not None:
        reasons.append(f"database unreachable: {snapshot.database_error}")
    return reasons


def heartbeat_late(snapshot: HealthSnapshot) -> bool:
    """Whether the last successful heartbeat is more than two intervals old."""
    age = snapshot.heartbeat_age_s
    return age is not None and age > 2 * snapshot.heartbeat_interval_s


def details(snapshot: HealthSnapshot) -> dict[str, Any]:
    """The ``/health`` document."""
    reasons = readiness(snapshot)
    return {
        "status": "ready" if not reasons else "not_ready",
        "reasons": reasons,
        "phase": snapshot.phase,
        "worker_id": snapshot.worker_id,
        "version": snapshot.version,
        "uptime_s": round(snapshot.uptime_s, 3),
        "database": {
            "reachable": snapshot.database_error is None,
            "error": snapshot.database_error,
        },
        "actors": {
            name: "alive" if alive else "dead" for name, alive in sorted(snapshot.actors.items())
        },
        "slots": snapshot.slots,
        "commit_lag": snapshot.commit,
        "heartbeat": {
            "last_age_s": None
            if snapshot.heartbeat_age_s is None
            else round(snapshot.heartbeat_age_s, 3),
            "interval_s": snapshot.heartbeat_interval_s,
            "late": heartbeat_late(snapshot),
        },
        # The relay's lag when this worker runs one (None otherwise).
        "relay": snapshot.extra.get("relay"),
    }
