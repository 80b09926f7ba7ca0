"""Claims made inside a result's commit (``claim_dependents``), on SQLite and PostgreSQL.

A commit that makes dependents ready may claim some of them in its own transaction. Such a
claim must be recorded exactly as a claim from the queue (``claim_ready_steps``): the
transition row from ``enqueued`` with reason ``claimed``, the attempt counted, ``claimed_by``
and ``claimed_at`` stamped, the parents' results (the one committed in the same transaction
included) handed over; so recovery, the commit guard and hand-backs treat it like any other.
"""

from __future__ import annotations

import dataclasses
import random
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, select

from duplex.clock import utcnow
from duplex.messages import StepOutcome
from duplex.storage.claims import claim_dependents
from duplex.storage.db import Database
from duplex.storage.models import workflow_step_transitions, workflow_steps
from duplex.storage.releases import release_claims
from duplex.storage.results import commit_outcomes
from tests.storage.support import BACKOFF_POLICY as POLICY
from tests.storage.support import claim, commit_and_claim, fan, ok, submit


def rows(db: Database, task: str) -> dict[str, Row[Any]]:
    with db.read() as conn:
        found = conn.execute(select(workflow_steps).where(workflow_steps.c.task_uuid == task))
        return {row.name: row for row in found}


def moves(db: Database, step_uuid: str) -> list[tuple[Any, ...]]:
    t = workflow_step_transitions
    with db.read() as conn:
        found = conn.execute(
            select(t.c.from_state, t.c.to_state, t.c.attempt, t.c.worker_id, t.c.reason)
            .where(t.c.step_uuid == step_uuid)
            .order_by(t.c.id)
        )
        return [tuple(row) for row in found]


def moved_at(db: Database, step_uuid: str, to_state: str) -> datetime:
    t = workflow_step_transitions
    with db.read() as conn:
        at: datetime = conn.execute(
            select(t.c.created_at).where(t.c.step_uuid == step_uuid, t.c.to_state == to_state)
        ).scalar_one()
    return at


def test_a_dependent_claimed_in_the_commit_is_recorded_as_any_claim(db: Database) -> None:
    t0 = utcnow()
    task = submit(db, fan(3), t0)
    (root,) = claim(db, t0)
    t1 = t0 + timedelta(seconds=1)

    report, claimed = commit_and_claim(db, [ok(root, t1, {"total": 10})], t1, limit=1)

    assert report.enqueued == 3
    assert report.parents_completed == 1
    assert sorted(r.step_uuid for r in report.ready) == sorted(
        row.step_uuid for name, row in rows(db, task).items() if name != "root"
    )
    (step,) = claimed
    after = rows(db, task)
    row = after[step.name]
    assert (row.state, row.attempts, row.claimed_by, row.claimed_at) == (
        "in_progress",
        1,
        "w1",
        t1,
    )
    assert row.next_attempt_at is None
    assert moves(db, step.step_uuid) == [
        (None, "pending", 0, None, "submitted"),
        ("pending", "enqueued", 0, None, "dependencies complete"),
        ("enqueued", "in_progress", 1, "w1", "claimed"),
    ]
    # Claimed in the transaction that completed its parent, at that very moment.
    assert moved_at(db, step.step_uuid, "in_progress") == moved_at(db, root.step_uuid, "complete")
    # What the handler gets: the result committed a moment ago in the same transaction.
    assert (step.attempt, step.claimed_by, step.claimed_at) == (1, "w1", t1)
    assert step.dependency_results == {"root": {"total": 10}}
    assert step.task_context == {"order": 7}
    assert not step.has_children
    # The others stay in the queue, for any worker.
    others = {name: r.state for name, r in after.items() if name not in ("root", step.name)}
    assert set(others.values()) == {"enqueued"}
    assert len(claim(db, t1, worker="w2")) == 2


def test_at_most_limit_dependents_are_claimed(db: Database) -> None:
    t0 = utcnow()
    task = submit(db, fan(4), t0)
    (root,) = claim(db, t0)
    _, claimed = commit_and_claim(db, [ok(root, t0, {})], t0, limit=2)
    assert len(claimed) == 2
    states = sorted(r.state for name, r in rows(db, task).items() if name != "root")
    assert states == ["enqueued", "enqueued", "in_progress", "in_progress"]


def test_a_limit_of_zero_or_nothing_ready_claims_nothing(db: Database) -> None:
    t0 = utcnow()
    task = submit(db, fan(2), t0)
    (root,) = claim(db, t0)
    report, claimed = commit_and_claim(db, [ok(root, t0, {})], t0, limit=0)
    assert (report.enqueued, claimed) == (2, [])
    with db.write() as conn:
        assert (
            claim_dependents(conn, [], worker_id="w1", namespaces=["default"], limit=5, now=t0)
            == []
        )
    assert {r.state for name, r in rows(db, task).items() if name != "root"} == {"enqueued"}


def test_only_dependents_of_the_workers_namespaces_are_claimed(db: Database) -> None:
    t0 = utcnow()
    mine = submit(db, fan(1, "default", "mine"), t0)
    theirs = submit(db, fan(1, "other", "theirs"), t0)
    roots = claim(db, t0, namespaces=("default", "other"))
    assert len(roots) == 2

    report, claimed = commit_and_claim(db, [ok(r, t0, {}) for r in roots], t0, limit=2)

    assert sorted(r.namespace for r in report.ready) == ["default", "other"]
    assert [(s.name, s.namespace) for s in claimed] == [("c0", "default")]
    assert rows(db, mine)["c0"].state == "in_progress"
    assert rows(db, theirs)["c0"].state == "enqueued"


def test_a_step_no_longer_enqueued_is_not_claimed(db: Database) -> None:
    t0 = utcnow()
    task = submit(db, fan(2), t0)
    (root,) = claim(db, t0)
    with db.write() as conn:
        report = commit_outcomes(
            conn, [ok(root, t0, {})], policy=POLICY, now=t0, rng=random.Random(0)
        )
    taken = claim(db, t0, worker="w2", limit=1)  # another worker got there first
    (theirs,) = taken
    before = moves(db, theirs.step_uuid)

    with db.write() as conn:
        claimed = claim_dependents(
            conn, report.ready, worker_id="w1", namespaces=["default"], limit=2, now=t0
        )

    # Only the one still enqueued; the other worker's claim is left as it was.
    assert [s.step_uuid for s in claimed] == [
        r.step_uuid for r in report.ready if r.step_uuid != theirs.step_uuid
    ]
    after = rows(db, task)
    assert after[theirs.name].claimed_by == "w2"
    assert after[theirs.name].attempts == 1
    assert moves(db, theirs.step_uuid) == before


def test_a_claim_a_commit_made_is_handed_back_and_guarded_like_any_other(db: Database) -> None:
    t0 = utcnow()
    task = submit(db, fan(1), t0)
    (root,) = claim(db, t0)
    _, (child,) = commit_and_claim(db, [ok(root, t0, {})], t0, limit=1)
    # A result by another claimant, or of another attempt, is rejected by the commit guard.
    foreign = StepOutcome(dataclasses.replace(child, claimed_by="w2"), t0, t0, result={})
    report, _ = commit_and_claim(db, [foreign], t0, limit=1)
    assert report.rejected == [foreign]
    with db.write() as conn:
        assert release_claims(conn, [child], worker_id="w1", now=t0, reason="released on stop") == 1
    row = rows(db, task)["c0"]
    assert (row.state, row.attempts, row.claimed_by) == ("enqueued", 0, None)
    (again,) = claim(db, t0, worker="w2")
    assert (again.step_uuid, again.attempt) == (child.step_uuid, 1)
