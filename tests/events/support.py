"""The relay tests' database side: tasks submitted, claimed and committed with domain events
through the real commit path (``commit_outcomes``), optionally rolled back; the relay pumped
until nothing is left unpublished; and the check that every committed event arrived, in
order.
"""

from __future__ import annotations

import random
import time

from hypothesis import strategies as st
from sqlalchemy import func, select

from duplex.clock import utcnow
from duplex.commit.retry import RetryPolicy
from duplex.events.relay import Relay
from duplex.messages import ClaimedStep, EmittedEvent, StepOutcome
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.models import domain_events
from duplex.storage.results import commit_outcomes
from duplex.storage.submission import create_task
from duplex.templates import parse_template

POLICY = RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=60_000, jitter=0.0)
de = domain_events


class Rollback(Exception):
    """Raised inside a commit's transaction to roll it back."""


def wide(n: int) -> str:
    steps = "".join(f'[[steps]]\nname = "s{i}"\nhandler = "t.s"\n' for i in range(n))
    return f'name = "relay_wide"\n{steps}'


def submit(db: Database, n: int) -> str:
    with db.write() as conn:
        return create_task(conn, parse_template(wide(n)), {}, now=utcnow())


def claim_all(db: Database, limit: int = 1000) -> list[ClaimedStep]:
    with db.write() as conn:
        return claim_ready_steps(
            conn, worker_id="w1", namespaces=("default",), limit=limit, now=utcnow()
        )


def outcome(step: ClaimedStep, n_events: int, name: str = "thing.happened") -> StepOutcome:
    now = utcnow()
    events = tuple(EmittedEvent(name, {"i": i, "step": step.name}) for i in range(n_events))
    return StepOutcome(step, now, now, result={}, events=events)


def commit(db: Database, outcomes: list[StepOutcome], *, rollback: bool = False) -> list[str]:
    """Commit (or roll back) outcomes; return the ids of the events they wrote."""
    try:
        with db.write() as conn:
            report = commit_outcomes(
                conn, outcomes, policy=POLICY, now=utcnow(), rng=random.Random(0)
            )
            if rollback:
                raise Rollback
    except Rollback:
        pass
    return [e.event_id for e in report.events]


def committed_events(db: Database, task_uuids: list[str]) -> dict[str, list[tuple[int, str]]]:
    with db.read() as conn:
        rows = conn.execute(
            select(de.c.task_uuid, de.c.sequence, de.c.event_id)
            .where(de.c.task_uuid.in_(task_uuids))
            .order_by(de.c.task_uuid, de.c.sequence)
        )
        found: dict[str, list[tuple[int, str]]] = {t: [] for t in task_uuids}
        for row in rows:
            found[row.task_uuid].append((row.sequence, row.event_id))
        return found


def unpublished(db: Database) -> int:
    with db.read() as conn:
        return conn.execute(
            select(func.count()).where(de.c.published_at.is_(None), de.c.skipped_at.is_(None))
        ).scalar_one()


def pump_until_drained(relay: Relay, db: Database, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while unpublished(db):
        assert time.monotonic() < deadline, f"{unpublished(db)} event(s) never published"
        if relay.pump() > 0:
            time.sleep(0.002)


def random_workload(
    db: Database, relay: Relay, data: st.DataObject, rng: random.Random
) -> tuple[list[str], set[str]]:
    """Random tasks committed in random batches (up to 3 rolled back), the relay pumped in
    between, then drained. Returns the tasks and the ids of the rolled-back events."""
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=4), label="tasks")
    tasks = [submit(db, n) for n in sizes]
    pending = claim_all(db)
    rng.shuffle(pending)
    rolled_back: set[str] = set()
    rollbacks_left = 3
    while pending:
        k = data.draw(st.integers(1, len(pending)), label="commit_batch")
        batch = [outcome(s, data.draw(st.integers(0, 3), label="events")) for s in pending[:k]]
        rollback = rollbacks_left > 0 and data.draw(st.booleans(), label="rollback")
        ids = commit(db, batch, rollback=rollback)
        if rollback:
            rollbacks_left -= 1
            rolled_back.update(ids)
        else:
            pending = pending[k:]
        for _ in range(data.draw(st.integers(0, 2), label="pumps")):
            relay.pump()
    pump_until_drained(relay, db)
    return tasks, rolled_back


def check_deliveries(
    db: Database,
    tasks: list[str],
    rolled_back: set[str],
    delivered: set[str],
    arrivals: dict[str, list[int]],
) -> None:
    """Every committed event arrived, none of a rolled-back commit, each task in order."""
    committed = committed_events(db, tasks)
    committed_ids = {event_id for events in committed.values() for _, event_id in events}
    assert delivered >= committed_ids, "a committed event never arrived"
    assert not (delivered - committed_ids), "an event of a rolled-back commit arrived"
    assert not (rolled_back & delivered)
    for task in tasks:
        assert arrivals.get(task, []) == [seq for seq, _ in committed[task]], "out of order"
