"""Recovering the running attempts of workers that died (DESIGN.md guarantee 9).

A worker is presumed dead when its heartbeat is older than ``event_system.claim_timeout_s``,
when it recorded its stop, or when it has no ``workers`` row at all. On the same host there is
a faster sign: its process no longer exists, so a restart after a crash resumes at once.
A worker never recovers its own claims.

Recovery runs every second on every worker, so it reads first (``has_lost_claims``) and opens
a write transaction only when there is something to recover.

Each lost attempt is committed like any result (``worker_lost``, retryable) through
``commit_outcomes``, which locks the tasks and guards every update: when two workers recover
at once, or a late result races the recovery, the attempt is settled exactly once.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Select, bindparam, exists, not_, or_, select

from duplex.commit.retry import RetryPolicy
from duplex.errors import WORKER_LOST
from duplex.messages import StepFailure, StepOutcome
from duplex.states import IN_PROGRESS
from duplex.storage.claims import STEP_COLUMNS, claimed_step
from duplex.storage.models import workers, workflow_steps
from duplex.storage.results import CommitReport, commit_outcomes

ws = workflow_steps


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
            workers.c.stopped_at.is_(None),
            workers.c.heartbeat_at >= heartbeat_cutoff,
        )
    )
    own_pid = os.getpid()
    dead = []
    for worker_id, pid, started_at in rows:
        if pid is None:
            continue
        if pid == own_pid:
            if started_at < PROCESS_STARTED_AT:
                dead.append(worker_id)
        elif not alive(pid):
            dead.append(worker_id)
    return sorted(dead)


def _lost_claims(
    *columns: Any, me: str, heartbeat_timeout: timedelta, now: datetime
) -> Select[Any]:
    """Select ``columns`` of the running attempts of dead workers (not ``me``'s).

    The statement takes the ``dead`` parameter: workers known dead besides the SQL rule.
    """
    cutoff = now - heartbeat_timeout
    alive = exists().where(
        workers.c.worker_id == ws.c.claimed_by,
        workers.c.heartbeat_at >= cutoff,
        workers.c.stopped_at.is_(None),
    )
    return select(*columns).where(
        ws.c.state == IN_PROGRESS,
        ws.c.claimed_by != me,
        or_(
            ws.c.claimed_by.in_(bindparam("dead", expanding=True)),
            not_(alive),
        ),
    )


def has_lost_claims(
    conn: Connection,
    *,
    me: str,
    heartbeat_timeout: timedelta,
    now: datetime,
    dead_workers: Collection[str] = (),
) -> bool:
    """Return whether dead workers hold running attempts: a read, so that a recovery with
    nothing to do opens no write transaction (on SQLite, one that every commit would wait
    for)."""
    query = _lost_claims(ws.c.step_uuid, me=me, heartbeat_timeout=heartbeat_timeout, now=now).limit(
        1
    )
    return conn.execute(query, {"dead": sorted(dead_workers)}).first() is not None


def recover_lost_claims(
    conn: Connection,
    *,
    me: str,
    heartbeat_timeout: timedelta,
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random,
    dead_workers: Collection[str] = (),
    limit: int = 500,
) -> CommitReport:
    """Fail the running attempts of dead workers as ``worker_lost``; retry them per policy.

    Run inside the caller's write transaction. ``dead_workers`` are known dead besides the
    SQL rule (see ``dead_local_workers``). ``me``'s own claims are never touched.
    """
    query = (
        _lost_claims(
            *STEP_COLUMNS,
            ws.c.claimed_by,
            ws.c.claimed_at,
            me=me,
            heartbeat_timeout=heartbeat_timeout,
            now=now,
        )
        .order_by(ws.c.claimed_at)
        .limit(limit)
    )
    outcomes = []
    for row in conn.execute(query, {"dead": sorted(dead_workers)}):
        step = claimed_step(row, claimed_by=row.claimed_by, claimed_at=row.claimed_at)
        why = "exited" if row.claimed_by in dead_workers else "stopped heart-beating"
        failure = StepFailure(
            WORKER_LOST,
            f"worker {row.claimed_by} {why} while running this attempt",
            retryable=True,
        )
        outcomes.append(StepOutcome(step, row.claimed_at, now, failure=failure))
    return commit_outcomes(conn, outcomes, policy=policy, now=now, rng=rng)
