"""Claiming without actors (``Claimer``): claims, failed claims that did commit, hand-backs."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection, select

from duplex.errors import StorageError
from duplex.intake.claimer import Claimer
from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.models import workflow_steps
from duplex.storage.submission import create_task
from duplex.templates import parse_template

ME = "w1"
T0 = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)


class FlakyDatabase(Database):
    """The test's database: a write may fail before it starts, or lose the reply to COMMIT."""

    def __init__(self, db: Database) -> None:
        super().__init__(DatabaseSettings(url=db.url, busy_timeout_ms=10_000))
        self.fail_next = False
        self.lose_next_commit_reply = False

    @contextmanager
    def write(self) -> Iterator[Connection]:
        if self.fail_next:
            self.fail_next = False
            raise StorageError("database unavailable")
        with super().write() as conn:
            yield conn
        if self.lose_next_commit_reply:  # committed, but the worker never hears so
            self.lose_next_commit_reply = False
            raise StorageError("connection lost")


@pytest.fixture
def db(sqlite_db: Database) -> Iterator[FlakyDatabase]:
    flaky = FlakyDatabase(sqlite_db)
    template = parse_template(
        'name = "c"\n' + "".join(f'[[steps]]\nname = "s{i}"\nhandler = "t.h"\n' for i in range(3))
    )
    with flaky.write() as conn:
        create_task(conn, template, {}, now=T0)
    yield flaky
    flaky.dispose()


def ticking_clock() -> Callable[[], datetime]:
    ticks = itertools.count(1)
    return lambda: T0 + timedelta(milliseconds=next(ticks))


def claimed_by(db: Database) -> dict[str, str | None]:
    with db.read() as conn:
        rows = conn.execute(select(workflow_steps.c.step_uuid, workflow_steps.c.claimed_by))
        return {row.step_uuid: row.claimed_by for row in rows}


def make_claimer(db: Database) -> Claimer:
    return Claimer(db, worker_id=ME, namespaces=["default"], clock=ticking_clock())


def test_a_claim_takes_at_most_limit_ready_steps(db: FlakyDatabase) -> None:
    claimer = make_claimer(db)
    assert len(claimer.claim(2) or []) == 2
    assert len(claimer.claim(2) or []) == 1
    assert claimer.claim(2) == []


def test_a_failed_claim_returns_none_and_claims_nothing(db: FlakyDatabase) -> None:
    claimer = make_claimer(db)
    db.fail_next = True
    assert claimer.claim(3) is None
    assert set(claimed_by(db).values()) == {None}
    assert len(claimer.claim(3) or []) == 3  # the unconfirmed claim had taken nothing
    assert claimer.unconfirmed == []


def test_a_claim_that_committed_unheard_is_handed_back_before_the_next(
    db: FlakyDatabase,
) -> None:
    claimer = make_claimer(db)
    db.lose_next_commit_reply = True
    assert claimer.claim(2) is None
    assert list(claimed_by(db).values()).count(ME) == 2  # held, though nobody knows
    assert len(claimer.unconfirmed) == 1

    # The next claim first hands those two back, then claims all three afresh.
    assert len(claimer.claim(3) or []) == 3
    assert claimer.unconfirmed == []


def test_settling_waits_while_the_database_still_fails(db: FlakyDatabase) -> None:
    claimer = make_claimer(db)
    db.lose_next_commit_reply = True
    assert claimer.claim(1) is None
    db.fail_next = True  # the settling write fails: the stamp is kept for later
    assert claimer.claim(1) is None
    assert len(claimer.unconfirmed) == 2
    assert len(claimer.claim(3) or []) == 3
    assert claimer.unconfirmed == []


def test_hand_back_returns_claims_to_the_queue(db: FlakyDatabase) -> None:
    claimer = make_claimer(db)
    steps = claimer.claim(3) or []
    assert claimer.hand_back(steps, "test") == 0
    assert set(claimed_by(db).values()) == {None}
    assert claimer.hand_back([], "nothing") == 0


def test_hand_back_counts_what_the_database_would_not_take(db: FlakyDatabase) -> None:
    claimer = make_claimer(db)
    steps = claimer.claim(3) or []
    db.fail_next = True
    assert claimer.hand_back(steps, "test") == 3
    assert set(claimed_by(db).values()) == {ME}
