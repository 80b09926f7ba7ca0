"""Health: whether the worker can take work, and the details behind the answer.

Plain code, no threads: ``gather`` makes a ``HealthSnapshot`` of what the worker knows (actor
liveness, a database probe, its own phase, its figures) and ``readiness`` turns it into
reasons not to send it work. The HTTP endpoints only serialise what these return. Nothing here
asks an actor anything: the HTTP threads must answer even when an actor is stuck.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from duplex.clock import utcnow
from duplex.errors import StorageError
from duplex.observability.metrics import WorkerMetrics
from duplex.observability.queue import QueueFigures
from duplex.storage.concurrency import running_per_key
from duplex.storage.db import Database
from duplex.storage.outbox import event_lag
from duplex.storage.pauses import list_pauses
from duplex.storage.queries import ready_queue
from duplex.storage.rate_limits import list_limits
from duplex.storage.workers import probe

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


def gather(
    metrics: WorkerMetrics,
    *,
    phase: Phase,
    failure: str | None,
    actors: dict[str, bool],
    database_error: str | None,
    heartbeat_age_s: float | None,
    heartbeat_interval_s: float,
    relay: bool,
) -> HealthSnapshot:
    """The snapshot of a worker whose figures are ``metrics`` (``relay``: it runs a relay,
    whose lag is read from the cached queue figures)."""
    slots, commit = metrics.slots(), metrics.commit()
    figures = metrics.queue_figures() if relay else None
    return HealthSnapshot(
        worker_id=metrics.worker_id,
        version=metrics.version,
        phase=phase,
        uptime_s=metrics.uptime_s(),
        actors={} if phase == "stopped" else actors,
        failure=failure,
        database_error=database_error,
        slots=None
        if slots is None
        else {
            "total": slots.total,
            "running": slots.running,
            "free": slots.free,
            "waiting": slots.waiting,
            "abandoned_threads": slots.abandoned_threads,
        },
        commit=None
        if commit is None
        else {"results_awaiting_commit": commit.awaiting, "failing": commit.failing},
        heartbeat_age_s=heartbeat_age_s,
        heartbeat_interval_s=heartbeat_interval_s,
        extra={"relay": None if figures is None else figures.relay},
    )


def database_error(db: Database) -> str | None:
    """Return why the database cannot be read, or None when it answers."""
    try:
        with db.read() as conn:
            probe(conn)
    except StorageError as exc:
        return str(exc).removeprefix("database error: ")
    return None


def read_queue(db: Database, namespaces: Sequence[str], *, relay: bool) -> QueueFigures:
    """Read the queue figures of ``namespaces`` (and the relay's lag, when there is a relay)."""
    now = utcnow()
    with db.read() as conn:
        ready, oldest = ready_queue(conn, namespaces, now=now)
        lag = event_lag(conn, now=now).as_json(now) if relay else None
        paused = tuple((p.kind, p.name) for p in list_pauses(conn))
        keys = tuple((k.key, k.running, k.held, k.limit) for k in running_per_key(conn, 20))
        tokens = tuple((r.name, r.tokens) for r in list_limits(conn, now=now))
    return QueueFigures(ready, oldest, lag, paused, keys, tokens)


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
