"""Eager dispatch in the commit path: ``Committer`` claims dependents in the commit's own
transaction, on SQLite and PostgreSQL.

At most one dependent per result that completed a parent, at most ``eager_limit`` per commit,
only of the worker's namespaces; the intake is woken only for the dependents left in the queue.
The claim lives and dies with the commit: a failure rolls back both, and a commit whose COMMIT
failed unheard has its claims handed back before anything else commits.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, select

import duplex.commit.committer as committer_module
from duplex.commit.buffer import CommitBuffer
from duplex.commit.committer import Committer
from duplex.commit.retry import RetryPolicy
from duplex.errors import TASK_DEADLINE_EXCEEDED, StorageError
from duplex.messages import ClaimedStep, StepFailure, StepOutcome
from duplex.settings import DatabaseSettings
from duplex.storage.claims import claim_dependents, claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.models import workflow_step_transitions, workflow_steps
from duplex.storage.readiness import ReadyStep
from duplex.storage.results import commit_outcomes
from duplex.storage.submission import create_task
from duplex.templates import parse_template

ME = "w1"
T0 = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)
NOW = T0 + timedelta(seconds=2)
POLICY = RetryPolicy(base_ms=60_000, multiplier=1.0, max_ms=60_000, jitter=0.0)


def fan(db: Database, children: int, *, name: str = "fan", namespace: str = "default") -> None:
    """Submit a root with ``children`` dependents (none: a lone step)."""
    steps = '[[steps]]\nname = "root"\nhandler = "t.h"\n' + "".join(
        f'[[steps]]\nname = "c{i}"\nhandler = "t.h"\ndepends_on = ["root"]\n'
        for i in range(children)
    )
    template = parse_template(f'name = "{name}"\nnamespace = "{namespace}"\n{steps}')
    with db.write() as conn:
        create_task(conn, template, {}, now=T0)


def claim_roots(db: Database, namespaces: Sequence[str] = ("default",)) -> list[ClaimedStep]:
    with db.write() as conn:
        return claim_ready_steps(conn, worker_id=ME, namespaces=namespaces, limit=50, now=T0)


def done(step: ClaimedStep) -> StepOutcome:
    return StepOutcome(step, T0, T0 + timedelta(seconds=1), result={"from": step.name})


def committer(
    db: Database, buffer: CommitBuffer, *, eager_limit: int = 10, namespaces: Sequence[str] = ()
) -> Committer:
    made = Committer(
        db,
        buffer,
        policy=POLICY,
        worker_id=ME,
        claim_timeout_s=30,
        clock=lambda: NOW,
        rng=random.Random(0),
        hostname="this-host",
        namespaces=namespaces or ("default",),
    )
    made.eager_limit = eager_limit
    return made


def buffered(steps: Sequence[ClaimedStep]) -> CommitBuffer:
    buffer = CommitBuffer(50)
    for step in steps:
        buffer.add(done(step))
    return buffer


def states(db: Database) -> dict[str, tuple[str, int, str | None]]:
    """Step uuid -> (state, attempts, claimed_by)."""
    ws = workflow_steps
    with db.read() as conn:
        rows = conn.execute(
            select(ws.c.step_uuid, ws.c.name, ws.c.state, ws.c.attempts, ws.c.claimed_by)
        )
        return {row.step_uuid: (row.state, row.attempts, row.claimed_by) for row in rows}


def claims_recorded(db: Database) -> list[tuple[str, str, int, str | None, datetime]]:
    t = workflow_step_transitions
    with db.read() as conn:
        rows = conn.execute(
            select(t.c.step_uuid, t.c.from_state, t.c.attempt, t.c.worker_id, t.c.created_at)
            .where(t.c.to_state == "in_progress")
            .order_by(t.c.id)
        )
        return [tuple(row) for row in rows]


def test_a_commit_claims_one_dependent_per_completed_parent(db: Database) -> None:
    fan(db, 3, name="wide")
    fan(db, 1, name="narrow")
    fan(db, 0, name="lone")
    roots = claim_roots(db)
    made = committer(db, buffered(roots))

    (announcement,) = made.flush_batch().announcements

    # Three results, two of them parents: two claims, in the same transaction.
    report = announcement.report
    assert (report.parents_completed, report.enqueued) == (2, 4)
    assert len(announcement.claimed) == 2
    assert all(
        (s.claimed_by, s.attempt, s.claimed_at) == (ME, 1, NOW) for s in announcement.claimed
    )
    assert made.counts["claimed_eagerly"] == 2
    after = states(db)
    assert sorted(after[s.step_uuid] for s in announcement.claimed) == [("in_progress", 1, ME)] * 2
    assert sorted(state for state, _, _ in after.values()).count("enqueued") == 2
    # Two dependents were left in the queue: the intake must look for them.
    assert announcement.wake_intake
    eager = [row for row in claims_recorded(db) if row[4] == NOW]
    assert [(row[1], row[2], row[3]) for row in eager] == [("enqueued", 1, ME)] * 2


def test_the_intake_is_not_woken_when_every_dependent_was_claimed(db: Database) -> None:
    fan(db, 1)
    (announcement,) = committer(db, buffered(claim_roots(db))).flush_batch().announcements
    assert len(announcement.claimed) == 1
    assert not announcement.wake_intake


def test_eager_limit_caps_the_claims_of_a_commit(db: Database) -> None:
    for i in range(3):
        fan(db, 2, name=f"t{i}")
    (announcement,) = (
        committer(db, buffered(claim_roots(db)), eager_limit=2).flush_batch().announcements
    )
    assert announcement.report.parents_completed == 3
    assert len(announcement.claimed) == 2
    assert announcement.wake_intake


def test_without_eager_claims_every_dependent_goes_to_the_queue(db: Database) -> None:
    fan(db, 2)
    made = committer(db, buffered(claim_roots(db)), eager_limit=0)
    (announcement,) = made.flush_batch().announcements
    assert announcement.claimed == []
    assert announcement.wake_intake
    assert made.counts["claimed_eagerly"] == 0


def test_only_dependents_of_the_workers_namespaces_are_claimed(db: Database) -> None:
    fan(db, 1, name="mine")
    fan(db, 1, name="theirs", namespace="other")
    roots = claim_roots(db, ("default", "other"))
    made = committer(db, buffered(roots), namespaces=("default",))
    (announcement,) = made.flush_batch().announcements
    assert [s.namespace for s in announcement.claimed] == ["default"]
    assert announcement.wake_intake  # the other namespace's dependent waits in the queue


def test_a_failure_after_the_claim_rolls_back_the_commit_and_the_claim(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    fan(db, 2)
    roots = claim_roots(db)
    failures = [StorageError("connection lost")]

    def claim_then_fail(conn: Connection, ready: Sequence[ReadyStep], **kw: Any) -> Any:
        claimed = claim_dependents(conn, ready, **kw)
        assert claimed  # the claim was made, in this transaction
        if failures:
            raise failures.pop()
        return claimed

    monkeypatch.setattr(committer_module, "claim_dependents", claim_then_fail)
    buffer = buffered(roots)
    made = committer(db, buffer)
    before = states(db)

    flush = made.flush_batch()

    assert flush.failed
    assert flush.announcements == []
    assert states(db) == before  # the result and the claim both rolled back
    assert [row[0] for row in claims_recorded(db)] == [roots[0].step_uuid]
    assert buffer.held == 1
    assert made.counts["claimed_eagerly"] == 0

    (announcement,) = made.flush_batch().announcements  # the retry commits and claims
    assert len(announcement.claimed) == 1
    assert made.counts["claimed_eagerly"] == 1


class CommitHeardAsFailed(Database):
    """The test's database, whose next write transaction commits but reports a failure, as a
    connection lost just after the server committed."""

    def __init__(self, db: Database) -> None:
        super().__init__(DatabaseSettings(url=db.url, busy_timeout_ms=10_000))
        self.lose_next_commit = False

    @contextmanager
    def write(self) -> Iterator[Connection]:
        lose, self.lose_next_commit = self.lose_next_commit, False
        with super().write() as conn:
            yield conn
        if lose:
            raise StorageError("connection lost during COMMIT")


def test_claims_of_a_commit_heard_as_failed_are_handed_back_before_the_next_commit(
    db: Database,
) -> None:
    unheard = CommitHeardAsFailed(db)
    try:
        fan(unheard, 1)
        fan(unheard, 1, name="next")
        first, second = claim_roots(unheard)
        buffer = buffered([first])
        made = committer(unheard, buffer)
        unheard.lose_next_commit = True

        assert made.flush_batch().failed
        # It did commit: the parent is complete and its dependent claimed by this worker.
        after = states(unheard)
        assert after[first.step_uuid][0] == "complete"
        claimed = [uuid for uuid, state in after.items() if state == ("in_progress", 1, ME)]
        assert second.step_uuid in claimed
        (child,) = set(claimed) - {second.step_uuid}

        buffer.add(done(second))
        flush = made.flush_batch()

        # The dependent went back to the queue first (no one else would ever run it: its
        # claimant is alive), then the batch: the retried result is rejected as settled,
        # the other one applied and its own dependent claimed.
        (announcement,) = flush.announcements
        assert [o.step.step_uuid for o in announcement.report.rejected] == [first.step_uuid]
        assert [o.step.step_uuid for o in announcement.report.applied] == [second.step_uuid]
        assert len(announcement.claimed) == 1
        assert states(unheard)[child] == ("enqueued", 0, None)
        t = workflow_step_transitions
        with unheard.read() as conn:
            reasons = conn.execute(
                select(t.c.from_state, t.c.to_state, t.c.attempt, t.c.reason)
                .where(t.c.step_uuid == child)
                .order_by(t.c.id)
            ).all()
        assert [tuple(r) for r in reasons][-2:] == [
            ("enqueued", "in_progress", 1, "claimed"),
            ("in_progress", "enqueued", 0, "eager claim not confirmed (connection lost)"),
        ]
    finally:
        unheard.dispose()


def test_the_one_by_one_fallback_claims_nothing(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    fan(db, 1)
    fan(db, 1, name="other")
    roots = claim_roots(db)

    def refuse_batches(conn: Connection, outcomes: Sequence[StepOutcome], **kw: Any) -> Any:
        if len(outcomes) > 1:
            raise StorageError("value too long", transient=False, refused=True)
        return commit_outcomes(conn, outcomes, **kw)

    monkeypatch.setattr(committer_module, "commit_outcomes", refuse_batches)
    flush = committer(db, buffered(roots)).flush_batch()
    assert len(flush.announcements) == 2
    assert all(a.claimed == [] and a.wake_intake for a in flush.announcements)


def histories_are_chains(db: Database) -> list[tuple[str, list[tuple[str | None, str]]]]:
    """Each step's name and transitions in id order; each starts where the one before ended."""
    t, ws = workflow_step_transitions, workflow_steps
    with db.read() as conn:
        rows = conn.execute(
            select(ws.c.step_uuid, ws.c.name, t.c.from_state, t.c.to_state)
            .join(ws, ws.c.step_uuid == t.c.step_uuid)
            .order_by(t.c.id)
        ).all()
    history: dict[str, tuple[str, list[tuple[str | None, str]]]] = {}
    for step_uuid, name, from_state, to_state in rows:
        changes = history.setdefault(step_uuid, (name, []))[1]
        assert not changes or changes[-1][1] == from_state, f"{name}: {changes}, {from_state}"
        changes.append((from_state, to_state))
    return list(history.values())


def test_a_dependent_held_by_its_key_in_the_commit_keeps_its_history_in_order(
    db: Database,
) -> None:
    template = parse_template(
        'name = "then_sync"\n[[steps]]\nname = "prep"\nhandler = "t.p"\n'
        '[[steps]]\nname = "sync"\nhandler = "t.s"\ndepends_on = ["prep"]\n'
        'concurrency = { key = "context.customer", limit = 1 }\n'
    )
    with db.write() as conn:
        for _ in range(2):
            create_task(conn, template, {"customer": "a"}, now=T0)
    flush = committer(db, buffered(claim_roots(db))).flush_batch()
    assert [step.name for a in flush.announcements for step in a.claimed] == ["sync"]
    held = [changes for name, changes in histories_are_chains(db) if name == "sync"]
    assert ("enqueued", "waiting") in [change for changes in held for change in changes]


def test_a_dependent_cancelled_by_a_deadline_in_the_commit_keeps_its_history_in_order(
    db: Database,
) -> None:
    template = parse_template(
        'name = "t"\nmax_duration = "15m"\n[[steps]]\nname = "a"\nhandler = "t.h"\n'
        '[[steps]]\nname = "c"\nhandler = "t.h"\n'
        '[[steps]]\nname = "b"\nhandler = "t.h"\ndepends_on = ["a"]\n'
    )
    with db.write() as conn:
        create_task(conn, template, {}, now=T0)
    buffer = CommitBuffer(50)
    late = T0 + timedelta(minutes=16)
    for step in claim_roots(db):
        if step.name == "a":
            buffer.add(StepOutcome(step, T0, late, result={}))
        else:
            failure = StepFailure(TASK_DEADLINE_EXCEEDED, "past the deadline", retryable=False)
            buffer.add(StepOutcome(step, T0, late, failure=failure))
    made = committer(db, buffer)
    made._clock = lambda: late
    assert made.flush_batch().ok
    assert dict(histories_are_chains(db))["b"] == [
        (None, "pending"),
        ("pending", "enqueued"),
        ("enqueued", "cancelled"),
    ]
