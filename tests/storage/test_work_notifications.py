"""PostgreSQL's work notification (``duplex_work``) is sent at commit for the steps still
claimable then, and only for those: a dependent a result's commit claims for itself (eager
dispatch) wakes no worker, one it leaves in the queue does (migration 0019)."""

from __future__ import annotations

import random

import psycopg

from duplex.clock import utcnow
from duplex.commit.retry import RetryPolicy
from duplex.messages import StepOutcome
from duplex.storage.claims import claim_dependents, claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.listen import WORK_CHANNEL, libpq_url
from duplex.storage.results import commit_outcomes
from duplex.storage.submission import create_task
from duplex.templates import parse_template

CHAIN = parse_template(
    'name = "pair"\nnamespace = "notified"\n[[steps]]\nname = "a"\nhandler = "t.a"\n'
    '[[steps]]\nname = "b"\nhandler = "t.b"\ndepends_on = ["a"]\n'
)


def commit_a(db: Database, *, claim_b: bool) -> None:
    """Commit ``a``'s result; its commit claims ``b`` in the same transaction if asked."""
    with db.write() as conn:
        (a,) = claim_ready_steps(
            conn, worker_id="w1", namespaces=["notified"], limit=1, now=utcnow()
        )
    now = utcnow()
    with db.write() as conn:
        report = commit_outcomes(
            conn,
            [StepOutcome(a, now, now, result={})],
            policy=RetryPolicy(),
            now=now,
            rng=random.Random(0),
        )
        if claim_b:
            claimed = claim_dependents(
                conn, report.ready, worker_id="w1", namespaces=["notified"], limit=1, now=now
            )
            assert [step.name for step in claimed] == ["b"]


def test_only_steps_still_claimable_at_commit_wake_the_workers(postgres_db: Database) -> None:
    db = postgres_db
    with psycopg.connect(libpq_url(db.url), autocommit=True) as listener:
        listener.execute(f"LISTEN {WORK_CHANNEL}")
        with db.write() as conn:
            create_task(conn, CHAIN, {}, now=utcnow())
        # Delivered at the submission's commit, which has returned: here, or never.
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["notified"]
        commit_a(db, claim_b=True)
        assert [n.payload for n in listener.notifies(timeout=0.5)] == []
        with db.write() as conn:
            create_task(conn, CHAIN, {}, now=utcnow())
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["notified"]
        commit_a(db, claim_b=False)
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["notified"]
