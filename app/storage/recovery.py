"""Recovering the running attempts of workers that died (docs/architecture.md, Guarantee 9).

A worker is presumed dead by the liveness rule (``duplex.storage.workers``), or when it has no
``workers`` row at all. On the same host there is a faster sign: its process no longer exists
(``dead_local_workers``), so a restart after a crash resumes at once. A worker never recovers
its own claims.

Recovery runs every second on every worker, so it reads first (``has_lost_claims``) and opens
a write transaction only when there is something to recover.

Each lost attempt is committed like any result (``worker_lost``, retryable) through
``commit_outcomes``, which locks the tasks and guards every update: when two workers recover
at once, or a late result races the recovery, the attempt is settled exactly once.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Select, bindparam, exists, not_, or_, select

from duplex.commit.retry import RetryPolicy
from duplex.errors import WORKER_LOST
from duplex.messages import StepFailure, StepOutcome
from duplex.states import IN_PROGRESS
from duplex.storage.claims import STEP_COLUMNS, claimed_step
from duplex.storage.models import workers, workflow_steps
from duplex.storage.results import CommitReport, commit_outcomes
from duplex.storage.workers import alive_in_sql

ws = workflow_steps


def _lost_claims(*columns: Any, me: str, heartbeat_cutoff: datetime) -> Select[Any]:
    """Select ``columns`` of the running attempts of dead workers (not ``me``'s).

    The statement takes the ``dead`` parameter: workers known dead besides the SQL rule.
    """
    alive = exists().where(workers.c.worker_id == ws.c.claimed_by, alive_in_sql(heartbeat_cutoff))
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
    heartbeat_cutoff: datetime,
    dead_workers: Collection[str] = (),
) -> bool:
    """Return whether dead workers hold running attempts: a read, so that a recovery with
    nothing to do opens no write transaction (on SQLite, one that every commit would wait
    for)."""
    query = _lost_claims(ws.c.step_uuid, me=me, heartbeat_cutoff=heartbeat_cutoff).limit(1)
    return conn.execute(query, {"dead": sorted(dead_workers)}).first() is not None


def recover_lost_claims(
    conn: Connection,
    *,
    me: str,
    heartbeat_cutoff: datetime,
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random,
    dead_workers: Collection[str] = (),
    limit: int = 500,
) -> CommitReport:
    """Fail the running attempts of dead workers as ``worker_lost``; retry them per policy.

    Run inside the caller's write transaction. ``heartbeat_cutoff`` is the liveness rule's
    (``duplex.storage.workers.heartbeat_cutoff``); ``dead_workers`` are known dead besides the
    SQL rule (``duplex.storage.workers.dead_local_workers``). ``me``'s own claims are never
    touched.
    """
    query = (
        _lost_claims(
            *STEP_COLUMNS,
            ws.c.claimed_by,
            ws.c.claimed_at,
            me=me,
            heartbeat_cutoff=heartbeat_cutoff,
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
