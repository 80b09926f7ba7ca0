"""Checkpoints in storage, on both databases: a checkpoint is saved only while its attempt holds
its claim and its task is not cancelled, and the next claim of the step (a retry, a recovery,
an operator's ``duplex retry``) hands the last accepted one to the handler."""

from __future__ import annotations

import random
import threading
from datetime import timedelta
from typing import Any

from sqlalchemy import text

from duplex.clock import utcnow
from duplex.errors import HANDLER_TIMEOUT, WORKER_LOST
from duplex.messages import ClaimedStep, StepFailure, StepOutcome
from duplex.storage.db import Database
from duplex.storage.operations import cancel_task, retry_step
from duplex.storage.recovery import recover_lost_claims
from duplex.storage.results import commit_outcomes
from duplex.storage.step_store import DatabaseStepStore
from tests.conftest import wait_until
from tests.storage.support import POLICY, Flow, add_worker

# One step, retried at once (POLICY: no backoff).
ONE = """
name = "ops"
[[steps]]
name = "a"
handler = "t.h"
max_attempts = 3
"""


def fail(db: Database, step: ClaimedStep, error_type: str, *, retryable: bool = True) -> None:
    now = utcnow()
    outcome = StepOutcome(step, now, now, failure=StepFailure(error_type, "failed", retryable))
    with db.write() as conn:
        report = commit_outcomes(conn, [outcome], policy=POLICY, now=now, rng=random.Random(0))
    assert report.applied == [outcome]


def stored(flow: Flow) -> Any:
    return flow.step("a").checkpoint


def test_an_accepted_checkpoint_is_what_the_next_attempt_starts_from(db: Database) -> None:
    store = DatabaseStepStore(db)
    flow = Flow(db, ONE)
    (first,) = flow.claim("a")
    assert first.checkpoint_state is None  # nothing saved yet

    assert store.save_checkpoint(first, {"done": 1})
    assert store.save_checkpoint(first, {"done": 2})  # the last one counts
    fail(db, first, "boom")

    (second,) = flow.claim("a")
    assert (second.attempt, second.checkpoint_state) == (2, {"done": 2})
    assert store.save_checkpoint(second, [3, "three"])  # any JSON value
    flow.run(second)
    assert stored(flow) == [3, "three"]  # kept after the step completed


def test_an_operators_retry_keeps_the_checkpoint(db: Database) -> None:
    """``duplex retry`` gives a failed step one more attempt at the same work: it resumes from
    the last accepted checkpoint rather than starting over."""
    store = DatabaseStepStore(db)
    flow = Flow(db, ONE)
    (first,) = flow.claim("a")
    assert store.save_checkpoint(first, {"page": 7})
    fail(db, first, "permanent", retryable=False)
    assert flow.states() == {"a": "error"}

    flow.operate(retry_step, flow.uuid_of("a"))

    (again,) = flow.claim("a")
    assert (again.attempt, again.checkpoint_state) == (2, {"page": 7})


def test_a_timed_out_attempts_checkpoint_is_rejected(db: Database) -> None:
    store = DatabaseStepStore(db)
    flow = Flow(db, ONE)
    (first,) = flow.claim("a")
    assert store.save_checkpoint(first, {"done": 1})
    # The Dispatcher committed the timeout; the abandoned thread runs on and saves.
    fail(db, first, HANDLER_TIMEOUT)

    assert not store.save_checkpoint(first, {"done": 2})
    assert stored(flow) == {"done": 1}
    # Nor once the step is claimed again by the same worker: another attempt holds it now.
    (second,) = flow.claim("a")
    assert second.checkpoint_state == {"done": 1}
    assert not store.save_checkpoint(first, {"done": 2})
    assert stored(flow) == {"done": 1}
    assert store.save_checkpoint(second, {"done": 5})


def test_a_checkpoint_of_an_attempt_recovered_as_lost_is_rejected(db: Database) -> None:
    store = DatabaseStepStore(db)
    flow = Flow(db, ONE)
    now = utcnow()
    timeout = timedelta(seconds=30)
    add_worker(db, "w1", heartbeat_at=now - timeout - timedelta(seconds=1))  # silent too long
    (first,) = flow.claim("a")  # claimed by w1
    assert store.save_checkpoint(first, {"done": 1})
    with db.write() as conn:
        report = recover_lost_claims(
            conn,
            me="recoverer",
            heartbeat_cutoff=now - timeout,
            now=now,
            policy=POLICY,
            rng=random.Random(0),
        )
    (lost,) = report.applied
    assert lost.failure is not None
    assert lost.failure.error_type == WORKER_LOST

    # The worker was not dead after all (a long pause): what it saves now is refused.
    assert not store.save_checkpoint(first, {"done": 2})
    assert stored(flow) == {"done": 1}
    (second,) = flow.claim("a")
    assert second.checkpoint_state == {"done": 1}


def test_a_cancelled_tasks_running_attempt_cannot_checkpoint(db: Database) -> None:
    store = DatabaseStepStore(db)
    flow = Flow(db, ONE)
    (first,) = flow.claim("a")
    assert store.save_checkpoint(first, {"done": 1})

    report = flow.operate(cancel_task, flow.task)

    assert report.still_running == 1  # the attempt still holds its claim...
    assert flow.states() == {"a": "in_progress"}
    assert not store.save_checkpoint(first, {"done": 2})  # ...but saves nothing more
    assert stored(flow) == {"done": 1}


def test_a_checkpoint_of_a_step_that_does_not_exist_is_rejected(db: Database) -> None:
    store = DatabaseStepStore(db)
    flow = Flow(db, ONE)
    (first,) = flow.claim("a")
    other = ClaimedStep(
        "00000000-0000-0000-0000-000000000000", flow.task, "a", "t.h", 1, 3, True, None, "w1"
    )
    assert not store.save_checkpoint(other, {"done": 1})
    assert stored(flow) is None
    assert first.checkpoint_state is None


def test_a_checkpoint_waiting_for_the_commit_of_its_timeout_is_rejected(
    postgres_db: Database,
) -> None:
    """READ COMMITTED: the checkpoint's UPDATE finds the step row locked by the commit that
    settles its attempt, waits, and checks its guard again on the row that commit left."""
    db = postgres_db
    store = DatabaseStepStore(db)
    flow = Flow(db, ONE)
    (first,) = flow.claim("a")
    assert store.save_checkpoint(first, {"done": 1})
    answers: list[bool] = []
    now = utcnow()
    timeout = StepOutcome(first, now, now, failure=StepFailure(HANDLER_TIMEOUT, "late", True))

    with db.write() as conn:
        commit_outcomes(conn, [timeout], policy=POLICY, now=now, rng=random.Random(0))
        # The commit holds the step row until it ends: the checkpoint must wait for it.
        saver = threading.Thread(
            target=lambda: answers.append(store.save_checkpoint(first, {"done": 2}))
        )
        saver.start()
        assert wait_until(lambda: _waiting_on_a_lock(db) == 1)
    saver.join(10)

    assert answers == [False]
    assert stored(flow) == {"done": 1}


def _waiting_on_a_lock(db: Database) -> int:
    # A transaction of its own per look: PostgreSQL keeps the first snapshot of
    # pg_stat_activity a transaction takes until it ends, so a second look in the same one
    # would never see the checkpoint start waiting.
    with db.read() as conn:
        return _count_waiting(conn)


def _count_waiting(conn: Any) -> int:
    return int(
        conn.execute(
            text(
                # Only this database's backends: other test runs may share the server.
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
                " AND query LIKE 'UPDATE workflow_steps SET checkpoint%'"
            )
        ).scalar_one()
    )
