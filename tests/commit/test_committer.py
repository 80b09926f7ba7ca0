"""The commit path's logic without actors: ``Committer`` over a ``CommitBuffer``.

A batch commits in one transaction and is announced only once committed; a failed commit keeps
the batch for a retry with backoff and announces nothing; a batch the database refuses is
committed one result at a time, the refused result recorded as ``result_unstorable``; lost
workers' running attempts are recovered as ``worker_lost``.
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
from duplex.errors import RESULT_UNSTORABLE, WORKER_LOST, StorageError
from duplex.messages import ClaimedStep, StepFailure, StepOutcome
from duplex.settings import DatabaseSettings
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.models import workflow_steps
from duplex.storage.results import commit_outcomes
from duplex.storage.submission import create_task
from duplex.templates import parse_template
from tests.storage.support import add_worker

ME = "w1"
T0 = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)
POLICY = RetryPolicy(base_ms=60_000, multiplier=1.0, max_ms=60_000, jitter=0.0)


def task(db: Database, steps: int, *, max_attempts: int = 3) -> None:
    template = parse_template(
        'name = "c"\n'
        + "".join(
            f'[[steps]]\nname = "s{i}"\nhandler = "t.h"\nmax_attempts = {max_attempts}\n'
            for i in range(steps)
        )
    )
    with db.write() as conn:
        create_task(conn, template, {}, now=T0)


def claim(db: Database, limit: int, worker_id: str = ME) -> list[ClaimedStep]:
    with db.write() as conn:
        return claim_ready_steps(
            conn, worker_id=worker_id, namespaces=("default",), limit=limit, now=T0
        )


def done(step: ClaimedStep) -> StepOutcome:
    return StepOutcome(step, T0, T0 + timedelta(seconds=1), result={"ok": True})


def failed(step: ClaimedStep) -> StepOutcome:
    failure = StepFailure("handler_error", "no", retryable=True)
    return StepOutcome(step, T0, T0 + timedelta(seconds=1), failure=failure)


def states(db: Database) -> dict[str, tuple[str, Any]]:
    with db.read() as conn:
        rows = conn.execute(
            select(workflow_steps.c.step_uuid, workflow_steps.c.state, workflow_steps.c.error)
        ).all()
    return {row.step_uuid: (row.state, row.error) for row in rows}


class FailingDatabase(Database):
    """The test's database, whose next ``failures`` write transactions fail."""

    def __init__(self, db: Database, *, refused: bool = False) -> None:
        super().__init__(DatabaseSettings(url=db.url, busy_timeout_ms=10_000))
        self.failures = 0
        self.refused = refused

    @contextmanager
    def write(self) -> Iterator[Connection]:
        if self.failures:
            self.failures -= 1
            raise StorageError("connection lost", refused=self.refused)
        with super().write() as conn:
            yield conn


@pytest.fixture
def failing(sqlite_db: Database) -> Iterator[FailingDatabase]:
    db = FailingDatabase(sqlite_db)
    yield db
    db.dispose()


def make_committer(
    db: Database, buffer: CommitBuffer, *, clock_at: datetime = T0 + timedelta(seconds=2)
) -> Committer:
    return Committer(
        db,
        buffer,
        policy=POLICY,
        worker_id=ME,
        claim_timeout_s=30,
        clock=lambda: clock_at,
        rng=random.Random(0),
        hostname="this-host",
    )


def test_an_empty_buffer_commits_nothing(failing: FailingDatabase) -> None:
    failing.failures = 1  # a commit would fail
    flush = make_committer(failing, CommitBuffer(10)).flush_batch()
    assert flush.ok
    assert flush.announcements == []


def test_a_batch_commits_in_one_transaction_and_is_announced_once(sqlite_db: Database) -> None:
    task(sqlite_db, 3)
    steps = claim(sqlite_db, 3)
    buffer = CommitBuffer(10)
    for step in steps:
        buffer.add(done(step))
    committer = make_committer(sqlite_db, buffer)

    flush = committer.flush_batch()

    assert flush.ok
    assert not flush.retried
    (announcement,) = flush.announcements
    assert [o.step.step_uuid for o in announcement.report.applied] == [s.step_uuid for s in steps]
    assert not announcement.wake_intake  # no dependents, nothing released
    assert announcement.retry_due_in_s is None
    assert not announcement.recovery
    assert not buffer
    assert committer.counts["committed"] == 3
    assert {state for state, _ in states(sqlite_db).values()} == {"complete"}


def test_a_batch_takes_at_most_batch_size_results(sqlite_db: Database) -> None:
    task(sqlite_db, 3)
    buffer = CommitBuffer(2)
    for step in claim(sqlite_db, 3):
        buffer.add(done(step))
    committer = make_committer(sqlite_db, buffer)
    assert len(committer.flush_batch().announcements[0].report.applied) == 2
    assert buffer.held == 1
    assert len(committer.flush_batch().announcements[0].report.applied) == 1
    assert not buffer


def test_a_failed_commit_keeps_the_batch_announces_nothing_and_backs_off(
    failing: FailingDatabase,
) -> None:
    task(failing, 2)
    buffer = CommitBuffer(10)
    for step in claim(failing, 2):
        buffer.add(done(step))
    committer = make_committer(failing, buffer)
    failing.failures = 2

    first = committer.flush_batch()
    second = committer.flush_batch()
    third = committer.flush_batch()

    assert (first.failed, first.retried, first.announcements) == (True, False, [])
    assert (second.failed, second.retried, second.announcements) == (True, True, [])
    assert second.retry_in_s == 2 * first.retry_in_s  # backoff doubles
    assert third.ok
    assert third.retried
    assert len(third.announcements[0].report.applied) == 2
    assert committer.counts["commit_errors"] == 2
    assert not buffer.failing


def test_a_refused_batch_commits_one_by_one_and_records_the_refused_result(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    task(sqlite_db, 3)
    steps = claim(sqlite_db, 3)
    poison = steps[1].step_uuid

    def refusing(conn: Connection, outcomes: Sequence[StepOutcome], **kw: Any) -> Any:
        if any(o.step.step_uuid == poison and o.succeeded for o in outcomes):
            raise StorageError("value too long", transient=False, refused=True)
        return commit_outcomes(conn, outcomes, **kw)

    monkeypatch.setattr(committer_module, "commit_outcomes", refusing)
    buffer = CommitBuffer(10)
    for step in steps:
        buffer.add(done(step))
    committer = make_committer(sqlite_db, buffer)

    flush = committer.flush_batch()

    assert flush.ok
    assert len(flush.announcements) == 3  # one per result, each after its own commit
    assert not buffer
    after = states(sqlite_db)
    assert after[poison][0] == "error"
    assert after[poison][1]["error_type"] == RESULT_UNSTORABLE
    assert [after[s.step_uuid][0] for s in steps if s.step_uuid != poison] == ["complete"] * 2


def test_a_failure_midway_through_one_by_one_keeps_what_is_left(
    failing: FailingDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    task(failing, 3)
    steps = claim(failing, 3)
    calls = 0

    def refused_then_lost(conn: Connection, outcomes: Sequence[StepOutcome], **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # the whole batch: refused
            raise StorageError("value too long", transient=False, refused=True)
        if calls == 3:  # the second result alone: the connection goes
            raise StorageError("connection lost")
        return commit_outcomes(conn, outcomes, **kw)

    monkeypatch.setattr(committer_module, "commit_outcomes", refused_then_lost)
    buffer = CommitBuffer(10)
    for step in steps:
        buffer.add(done(step))
    committer = make_committer(failing, buffer)

    flush = committer.flush_batch()

    assert flush.failed
    assert len(flush.announcements) == 1  # the first result committed before the failure
    assert [o.step.step_uuid for o in buffer.outcomes] == [s.step_uuid for s in steps[1:]]
    assert buffer.failing


def test_a_refused_release_is_kept_not_blamed_on_a_result(failing: FailingDatabase) -> None:
    task(failing, 1)
    buffer = CommitBuffer(10)
    buffer.add_releases(claim(failing, 1))
    failing.refused = True
    failing.failures = 1
    committer = make_committer(failing, buffer)
    assert committer.flush_batch().failed
    assert buffer.held == 1


def test_released_claims_wake_the_intake(sqlite_db: Database) -> None:
    task(sqlite_db, 2)
    buffer = CommitBuffer(10)
    buffer.add_releases(claim(sqlite_db, 2))
    committer = make_committer(sqlite_db, buffer)
    (announcement,) = committer.flush_batch().announcements
    assert announcement.wake_intake
    assert committer.counts["released"] == 2
    assert {state for state, _ in states(sqlite_db).values()} == {"enqueued"}


def test_a_retry_says_when_it_falls_due(sqlite_db: Database) -> None:
    task(sqlite_db, 1)
    buffer = CommitBuffer(10)
    (step,) = claim(sqlite_db, 1)
    buffer.add(failed(step))
    now = T0 + timedelta(seconds=2)
    (announcement,) = make_committer(sqlite_db, buffer, clock_at=now).flush_batch().announcements
    assert announcement.retry_due_in_s == pytest.approx(60.0)


def test_the_commit_that_ends_a_lag_says_so(sqlite_db: Database) -> None:
    task(sqlite_db, 4)
    buffer = CommitBuffer(2)
    lagging = [buffer.add(done(step)) for step in claim(sqlite_db, 4)]
    assert lagging == [False, True, False, False]
    committer = make_committer(sqlite_db, buffer)
    assert not committer.flush_batch().announcements[0].caught_up  # two still wait
    assert committer.flush_batch().announcements[0].caught_up


def test_a_late_result_is_rejected_and_counted(sqlite_db: Database) -> None:
    task(sqlite_db, 1)
    (step,) = claim(sqlite_db, 1)
    buffer = CommitBuffer(10)
    buffer.add(done(step))
    buffer.add(done(step))
    committer = make_committer(sqlite_db, buffer)
    (announcement,) = committer.flush_batch().announcements
    assert (len(announcement.report.applied), len(announcement.report.rejected)) == (1, 1)
    assert (committer.counts["committed"], committer.counts["rejected"]) == (1, 1)


def test_recovery_fails_a_dead_workers_attempts_as_worker_lost(sqlite_db: Database) -> None:
    task(sqlite_db, 2)
    add_worker(sqlite_db, ME, T0)
    add_worker(sqlite_db, "doomed", T0 - timedelta(hours=1))
    (mine,) = claim(sqlite_db, 1)
    (lost,) = claim(sqlite_db, 1, worker_id="doomed")
    committer = make_committer(sqlite_db, CommitBuffer(10))

    announcement = committer.recover_lost_claims()

    assert announcement is not None
    assert announcement.recovery
    assert [o.step.step_uuid for o in announcement.report.applied] == [lost.step_uuid]
    assert announcement.retry_due_in_s is not None  # it runs again after the backoff
    assert committer.counts["recovered"] == 1
    after = states(sqlite_db)
    assert after[lost.step_uuid][1]["error_type"] == WORKER_LOST
    assert after[mine.step_uuid][0] == "in_progress"
    assert committer.recover_lost_claims() is None  # once only


def test_recovery_with_nothing_lost_or_a_failing_database_announces_nothing(
    failing: FailingDatabase,
) -> None:
    task(failing, 1)
    add_worker(failing, ME, T0)
    claim(failing, 1)
    committer = make_committer(failing, CommitBuffer(10))
    assert committer.recover_lost_claims() is None
    failing.failures = 1
    assert committer.recover_lost_claims() is None
