"""Claims and commits on real databases (SQLite and PostgreSQL via the ``db`` fixture).

Plain functions, no actors: create_task, claim_ready_steps, commit_outcomes, release_claims,
recover_lost_claims and count_open_work, checked against the rows they leave behind.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Row, select, text, update

from duplex.clock import utcnow
from duplex.commit.retry import RetryPolicy
from duplex.errors import HANDLER_TIMEOUT, WORKER_LOST
from duplex.messages import (
    ClaimedStep,
    DeclaredEvent,
    EmittedEvent,
    StepFailure,
    StepOutcome,
)
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.models import (
    domain_events,
    tasks,
    workers,
    workflow_step_edges,
    workflow_step_transitions,
    workflow_steps,
)
from duplex.storage.queries import count_open_work
from duplex.storage.recovery import recover_lost_claims
from duplex.storage.releases import release_claims, release_unconfirmed_claim
from duplex.storage.results import CommitReport, commit_outcomes
from duplex.storage.submission import create_task
from duplex.storage.workers import (
    PROCESS_STARTED_AT,
    alive_workers,
    dead_local_workers,
    judge,
    judged_workers,
    process_exists,
    process_gone,
)
from duplex.templates import parse_template
from tests import processes
from tests.storage.support import WORKER_HOST, add_worker

POLICY = RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=60_000, jitter=0.0)
WAIT_S = 30.0

DIAMOND_PARENTS = {"b": {"a"}, "c": {"a"}, "d": {"b", "c"}}
DIAMOND = """
name = "diamond"
[[steps]]
name = "a"
handler = "t.a"
inputs = { n = 1, tags = ["x"] }
[[steps]]
name = "b"
handler = "t.b"
depends_on = ["a"]
[[steps]]
name = "c"
handler = "t.c"
depends_on = ["a"]
[[steps]]
name = "d"
handler = "t.d"
depends_on = ["b", "c"]
events = [
    { name = "order.done" },
    { name = "order.failed", condition = "failure" },
    { name = "order.audit", condition = "always" },
]
"""

SINGLE = """
name = "single"
[[steps]]
name = "only"
handler = "t.only"
max_attempts = {max_attempts}
retryable = {retryable}
events = [
    {{ name = "only.ok" }},
    {{ name = "only.failed", condition = "failure" }},
    {{ name = "only.audit", condition = "always" }},
]
"""


def wide(n: int, namespace: str = "default", max_attempts: int = 3) -> str:
    steps = "".join(
        f'[[steps]]\nname = "r{i}"\nhandler = "t.r"\nmax_attempts = {max_attempts}\n'
        for i in range(n)
    )
    return f'name = "wide"\nnamespace = "{namespace}"\n{steps}'


def single(max_attempts: int = 3, retryable: bool = True) -> str:
    return SINGLE.format(max_attempts=max_attempts, retryable=str(retryable).lower())


# --- helpers -----------------------------------------------------------------------------------


def submit(
    db: Database, template: str, now: datetime, context: dict[str, Any] | None = None
) -> str:
    with db.write() as conn:
        return create_task(conn, parse_template(template), context or {}, now=now)


def claim(
    db: Database,
    now: datetime,
    *,
    worker: str = "w1",
    namespaces: tuple[str, ...] = ("default",),
    limit: int = 10,
) -> list[ClaimedStep]:
    with db.write() as conn:
        return claim_ready_steps(
            conn, worker_id=worker, namespaces=namespaces, limit=limit, now=now
        )


def commit(db: Database, outcomes: list[StepOutcome], now: datetime) -> CommitReport:
    with db.write() as conn:
        return commit_outcomes(conn, outcomes, policy=POLICY, now=now, rng=random.Random(0))


def ok(
    step: ClaimedStep,
    now: datetime,
    result: dict[str, Any] | None = None,
    events: tuple[EmittedEvent, ...] = (),
) -> StepOutcome:
    return StepOutcome(step, now, now, result=result or {}, events=events)


def failed(
    step: ClaimedStep,
    now: datetime,
    error_type: str = "handler_error",
    *,
    retryable: bool = True,
    retry_after: float | None = None,
) -> StepOutcome:
    failure = StepFailure(error_type, f"{error_type} happened", retryable, None, retry_after)
    return StepOutcome(step, now, now, failure=failure)


def steps_of(db: Database, task: str) -> dict[str, Row[Any]]:
    with db.read() as conn:
        rows = conn.execute(select(workflow_steps).where(workflow_steps.c.task_uuid == task))
        return {row.name: row for row in rows}


def task_row(db: Database, task: str) -> Row[Any]:
    with db.read() as conn:
        return conn.execute(select(tasks).where(tasks.c.task_uuid == task)).one()


def transitions_of(db: Database, step_uuid: str) -> list[tuple[Any, ...]]:
    t = workflow_step_transitions
    with db.read() as conn:
        rows = conn.execute(
            select(t.c.from_state, t.c.to_state, t.c.attempt, t.c.worker_id, t.c.reason)
            .where(t.c.step_uuid == step_uuid)
            .order_by(t.c.id)
        )
        return [tuple(row) for row in rows]


def events_of(db: Database, task: str) -> list[Row[Any]]:
    with db.read() as conn:
        return list(conn.execute(select(domain_events).where(domain_events.c.task_uuid == task)))


def status_of(db: Database, task: str) -> Row[Any]:
    with db.read() as conn:
        return conn.execute(
            text("SELECT * FROM task_execution_status WHERE task_uuid = :t"), {"t": task}
        ).one()


def by_name(claimed: list[ClaimedStep]) -> dict[str, ClaimedStep]:
    return {step.name: step for step in claimed}


# --- submission --------------------------------------------------------------------------------


def test_submit_writes_task_steps_edges_and_transitions(db: Database) -> None:
    now = utcnow()
    task = submit(db, DIAMOND, now, {"order": {"id": 7}})
    row = task_row(db, task)
    assert (row.name, row.namespace, row.version, row.state) == (
        "diamond",
        "default",
        "1.0.0",
        "pending",
    )
    assert row.context == {"order": {"id": 7}}
    assert row.created_at == now
    steps = steps_of(db, task)
    assert {n: s.state for n, s in steps.items()} == {
        "a": "enqueued",
        "b": "pending",
        "c": "pending",
        "d": "pending",
    }
    assert all(s.attempts == 0 for s in steps.values())
    assert steps["a"].next_attempt_at == now
    assert steps["b"].next_attempt_at is None
    assert steps["a"].inputs == {"n": 1, "tags": ["x"]}
    with db.read() as conn:
        edges = {
            (e.from_step_uuid, e.to_step_uuid) for e in conn.execute(select(workflow_step_edges))
        }
    uuid_of = {n: s.step_uuid for n, s in steps.items()}
    assert edges == {
        (uuid_of["a"], uuid_of["b"]),
        (uuid_of["a"], uuid_of["c"]),
        (uuid_of["b"], uuid_of["d"]),
        (uuid_of["c"], uuid_of["d"]),
    }
    assert transitions_of(db, uuid_of["a"]) == [(None, "enqueued", 0, None, "submitted")]
    assert transitions_of(db, uuid_of["d"]) == [(None, "pending", 0, None, "submitted")]
    assert status_of(db, task).execution_status == "has_ready_steps"


# --- claims ------------------------------------------------------------------------------------


def test_claim_takes_only_enqueued_steps_and_records_the_claim(db: Database) -> None:
    now = utcnow()
    task = submit(db, DIAMOND, now, {"order": {"id": 7}})
    later = now + timedelta(seconds=1)
    (step,) = claim(db, later, worker="w1")
    rows = steps_of(db, task)
    a = rows["a"]
    assert step == ClaimedStep(
        step_uuid=a.step_uuid,
        task_uuid=task,
        name="a",
        handler="t.a",
        attempt=1,
        max_attempts=3,
        retryable=True,
        timeout_ms=None,
        claimed_by="w1",
        inputs={"n": 1, "tags": ["x"]},
        task_context={"order": {"id": 7}},
        dependency_results={},
        declared_events=(),
    )
    assert (a.state, a.attempts, a.claimed_by, a.claimed_at) == ("in_progress", 1, "w1", later)
    assert a.next_attempt_at is None
    assert {rows[n].state for n in "bcd"} == {"pending"}
    assert transitions_of(db, a.step_uuid)[-1] == ("enqueued", "in_progress", 1, "w1", "claimed")
    assert task_row(db, task).state == "in_progress"
    assert status_of(db, task).execution_status == "processing"
    assert claim(db, later) == []


def test_claim_respects_the_limit(db: Database) -> None:
    now = utcnow()
    task = submit(db, wide(5), now)
    first = claim(db, now, limit=2)
    assert len(first) == 2
    second = claim(db, now, limit=10)
    assert len(second) == 3
    assert claim(db, now, limit=10) == []
    names = [s.name for s in first + second]
    assert sorted(names) == [f"r{i}" for i in range(5)]
    # Each batch comes back oldest first (template order within a task).
    for batch in (first, second):
        assert [s.name for s in batch] == sorted(s.name for s in batch)
    assert {s.attempts for s in steps_of(db, task).values()} == {1}


def test_claim_takes_the_oldest_ready_steps_first(db: Database) -> None:
    now = utcnow()
    newer = submit(db, wide(2), now + timedelta(seconds=2))
    older = submit(db, wide(2), now)
    later = now + timedelta(seconds=5)
    first = claim(db, later, limit=2)
    assert {s.task_uuid for s in first} == {older}
    assert {s.task_uuid for s in claim(db, later, limit=2)} == {newer}


def test_claim_with_no_limit_or_no_namespace_claims_nothing(db: Database) -> None:
    now = utcnow()
    submit(db, wide(2), now)
    assert claim(db, now, limit=0) == []
    assert claim(db, now, limit=-1) == []
    assert claim(db, now, namespaces=()) == []
    assert len(claim(db, now)) == 2


def test_claim_respects_namespaces(db: Database) -> None:
    now = utcnow()
    alpha = submit(db, wide(2, namespace="alpha"), now)
    beta = submit(db, wide(3, namespace="beta"), now)
    assert claim(db, now, namespaces=("default", "gamma")) == []
    got_alpha = claim(db, now, namespaces=("alpha",))
    assert {s.task_uuid for s in got_alpha} == {alpha}
    assert len(got_alpha) == 2
    got_both = claim(db, now, namespaces=("alpha", "beta"))
    assert {s.task_uuid for s in got_both} == {beta}
    assert len(got_both) == 3


def test_claim_does_not_take_a_step_enqueued_after_now(db: Database) -> None:
    now = utcnow()
    submit(db, wide(1), now)
    assert claim(db, now - timedelta(seconds=1)) == []
    assert len(claim(db, now)) == 1


def test_claim_takes_retries_only_when_due_and_counts_the_attempt(db: Database) -> None:
    now = utcnow()
    task = submit(db, wide(1), now)
    (step,) = claim(db, now)
    commit(db, [failed(step, now)], now)
    due = now + timedelta(seconds=1)
    assert steps_of(db, task)["r0"].next_attempt_at == due
    assert claim(db, due - timedelta(milliseconds=1)) == []
    (retry,) = claim(db, due, worker="w2")
    assert (retry.step_uuid, retry.attempt, retry.claimed_by) == (step.step_uuid, 2, "w2")
    row = steps_of(db, task)["r0"]
    assert (row.state, row.attempts, row.claimed_by, row.next_attempt_at) == (
        "in_progress",
        2,
        "w2",
        None,
    )
    assert transitions_of(db, step.step_uuid)[-1] == (
        "waiting_for_retry",
        "in_progress",
        2,
        "w2",
        "claimed",
    )


def test_due_retries_are_claimed_before_enqueued_steps(db: Database) -> None:
    now = utcnow()
    submit(db, wide(1), now)
    (step,) = claim(db, now)
    commit(db, [failed(step, now)], now)
    later = now + timedelta(seconds=5)
    submit(db, wide(3), now + timedelta(seconds=2))
    (first,) = claim(db, later, limit=1)
    assert first.step_uuid == step.step_uuid
    assert first.attempt == 2


def test_claim_gives_parents_results(db: Database) -> None:
    now = utcnow()
    task = submit(db, DIAMOND, now, {"k": "v"})
    (a,) = claim(db, now)
    commit(db, [ok(a, now, {"total": 10})], now)
    bc = by_name(claim(db, now))
    assert set(bc) == {"b", "c"}
    assert bc["b"].dependency_results == {"a": {"total": 10}}
    assert bc["c"].dependency_results == {"a": {"total": 10}}
    assert bc["b"].task_context == {"k": "v"}
    commit(db, [ok(bc["b"], now, {"from": "b"}), ok(bc["c"], now)], now)
    (d,) = claim(db, now)
    assert d.name == "d"
    assert d.dependency_results == {"b": {"from": "b"}, "c": {}}
    assert d.declared_events == (
        DeclaredEvent("order.done", "success"),
        DeclaredEvent("order.failed", "failure"),
        DeclaredEvent("order.audit", "always"),
    )
    assert steps_of(db, task)["d"].attempts == 1


# Values a handler may return, as JSON keeps them: each must reach the dependent unchanged.
EXACT_RESULTS = {
    "big": 2**63 + 1,
    "negative": -12345678901234567890,
    "float": 0.1,
    "tiny": 1e-300,
    "text": 'ü \u2603 "quoted" \\ back',
    "nested": {"list": [1, "two", None, True, {"x": []}], "empty": {}},
}


def test_parents_results_reach_the_dependent_exactly(db: Database) -> None:
    now = utcnow()
    submit(db, DIAMOND, now)
    (a,) = claim(db, now)
    commit(db, [ok(a, now, EXACT_RESULTS)], now)
    bc = by_name(claim(db, now))
    assert bc["b"].dependency_results == {"a": EXACT_RESULTS}
    assert type(bc["b"].dependency_results["a"]["big"]) is int


@pytest.mark.parametrize("stored", [5, "text", [1, 2], None])
def test_a_parents_result_stored_as_any_json_value_reaches_the_dependent(
    db: Database, stored: Any
) -> None:
    """Rows written before results had to be objects (or by hand) hold any JSON value; SQLite
    keeps a bare number as a number, which the parents' read must not parse again."""
    now = utcnow()
    submit(db, DIAMOND, now)
    (a,) = claim(db, now)
    commit(db, [ok(a, now, {})], now)
    with db.write() as conn:
        conn.execute(
            update(workflow_steps).where(workflow_steps.c.step_uuid == a.step_uuid),
            {"results": stored},
        )
    bc = by_name(claim(db, now))
    assert bc["b"].dependency_results == {"a": stored if stored is not None else {}}


def test_two_claims_never_return_the_same_step(db: Database) -> None:
    now = utcnow()
    submit(db, wide(6), now)
    first = claim(db, now, worker="w1", limit=4)
    second = claim(db, now, worker="w2", limit=4)
    assert len(first) == 4
    assert len(second) == 2
    assert not {s.step_uuid for s in first} & {s.step_uuid for s in second}


def test_racing_threads_claim_every_step_exactly_once(db: Database) -> None:
    now = utcnow()
    n_steps, n_threads = 60, 4
    task = submit(db, wide(n_steps), now)
    barrier = threading.Barrier(n_threads)
    claimed: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def racer(index: int) -> None:
        worker = f"w{index}"
        rng = random.Random(index)
        mine: list[str] = []
        try:
            barrier.wait(WAIT_S)
            while True:
                got = claim(db, now, worker=worker, limit=rng.randint(1, 3))
                if not got:
                    break
                assert all(s.claimed_by == worker and s.attempt == 1 for s in got)
                mine.extend(s.step_uuid for s in got)
        except BaseException as exc:
            errors.append(exc)
        with lock:
            claimed[worker] = mine

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    everything = [uuid for uuids in claimed.values() for uuid in uuids]
    assert len(everything) == n_steps
    assert len(set(everything)) == n_steps
    rows = steps_of(db, task)
    assert {(r.state, r.attempts) for r in rows.values()} == {("in_progress", 1)}
    owner = {uuid: worker for worker, uuids in claimed.items() for uuid in uuids}
    assert all(r.claimed_by == owner[r.step_uuid] for r in rows.values())
    for r in rows.values():
        assert len(transitions_of(db, r.step_uuid)) == 2  # submitted + one claim
    assert claim(db, now) == []


# --- commits: success --------------------------------------------------------------------------


def test_success_completes_the_step_and_enqueues_children_when_all_parents_are_done(
    db: Database,
) -> None:
    now = utcnow()
    task = submit(db, DIAMOND, now)
    (a,) = claim(db, now)
    t1 = now + timedelta(seconds=1)
    outcome = ok(a, now, {"total": 10}, (EmittedEvent("payment.charged", {"total": 10}),))
    report = commit(db, [outcome], t1)
    assert report.applied == [outcome]
    assert report.rejected == []
    assert report.enqueued == 2
    assert report.next_retry_at is None
    rows = steps_of(db, task)
    assert (rows["a"].state, rows["a"].results, rows["a"].error) == (
        "complete",
        {"total": 10},
        None,
    )
    assert rows["a"].completed_at == t1
    assert rows["a"].started_at == now
    assert (rows["b"].state, rows["c"].state, rows["d"].state) == (
        "enqueued",
        "enqueued",
        "pending",
    )
    assert rows["b"].next_attempt_at == t1
    assert transitions_of(db, a.step_uuid)[-1] == ("in_progress", "complete", 1, "w1", "succeeded")
    assert transitions_of(db, rows["b"].step_uuid)[-1] == (
        "pending",
        "enqueued",
        0,
        None,
        "dependencies complete",
    )
    # Events: the handler's, then the lifecycle event, written with the result.
    assert [e.name for e in report.events] == ["payment.charged", "step.completed"]
    stored = {e.event_id: e for e in events_of(db, task)}
    assert set(stored) == {e.event_id for e in report.events}
    for event in report.events:
        row = stored[event.event_id]
        assert (row.name, row.step_uuid, row.payload) == (
            event.name,
            a.step_uuid,
            event.payload,
        )
    assert report.events[0].payload == {"total": 10}
    assert report.events[1].payload == {"step_name": "a", "handler": "t.a", "attempt": 1}
    assert task_row(db, task).state == "in_progress"

    # d waits for both b and c.
    bc = by_name(claim(db, t1))
    report_b = commit(db, [ok(bc["b"], t1)], t1)
    assert report_b.enqueued == 0
    assert steps_of(db, task)["d"].state == "pending"
    report_c = commit(db, [ok(bc["c"], t1)], t1)
    assert report_c.enqueued == 1
    assert steps_of(db, task)["d"].state == "enqueued"

    (d,) = claim(db, t1)
    report_d = commit(db, [ok(d, t1, {"done": True})], t1)
    # Declared events by condition: success and always, never failure.
    assert [e.name for e in report_d.events] == ["step.completed", "order.done", "order.audit"]
    assert report_d.events[1].payload["result"] == {"done": True}
    assert report_d.events[1].payload["outcome"] == "success"
    names = Counter(e.name for e in events_of(db, task))
    assert names == Counter(
        {"step.completed": 4, "payment.charged": 1, "order.done": 1, "order.audit": 1}
    )
    row = task_row(db, task)
    assert (row.state, row.completed_at) == ("complete", t1)
    status = status_of(db, task)
    assert (status.execution_status, status.total_steps, status.complete_steps) == (
        "all_complete",
        4,
        4,
    )
    with db.read() as conn:
        assert count_open_work(conn, ["default"]) == 0


def test_a_result_that_waited_for_its_task_lock_sees_the_claim_it_lost(
    postgres_db: Database,
) -> None:
    """Guarantee 3 on PostgreSQL: a commit that waits for a task lock held by a recovery of
    the same attempt must see that recovery once it gets the lock. The late result is then
    rejected cleanly, not checked against the claim as the statement's snapshot showed it
    (which rolled the whole batch back as a broken locking order)."""
    now = utcnow()
    task = submit(postgres_db, single(), now)
    (step,) = claim(postgres_db, now, worker="w1")
    recovering = threading.Event()
    release = threading.Event()

    def recovery() -> None:
        with postgres_db.write() as conn:
            lost = StepFailure(WORKER_LOST, "presumed dead", True)
            report = commit_outcomes(
                conn,
                [StepOutcome(step, now, now, failure=lost)],
                policy=POLICY,
                now=now,
                rng=random.Random(0),
            )
            assert len(report.applied) == 1
            recovering.set()  # holds the task lock until released
            release.wait(10)

    recoverer = threading.Thread(target=recovery)
    recoverer.start()
    assert recovering.wait(10)
    late: list[CommitReport] = []
    committer = threading.Thread(
        target=lambda: late.append(commit(postgres_db, [ok(step, now)], now))
    )
    committer.start()
    time.sleep(0.3)  # the late result's commit now waits for the task lock
    assert committer.is_alive()
    release.set()
    recoverer.join(10)
    committer.join(10)
    assert len(late) == 1, "the late result's commit failed"
    assert late[0].applied == []
    assert [o.step.step_uuid for o in late[0].rejected] == [step.step_uuid]
    row = steps_of(postgres_db, task)["only"]
    assert (row.state, row.error["error_type"]) == ("waiting_for_retry", WORKER_LOST)


def test_both_parents_in_one_batch_enqueue_the_child_once(db: Database) -> None:
    now = utcnow()
    task = submit(db, DIAMOND, now)
    (a,) = claim(db, now)
    commit(db, [ok(a, now)], now)
    bc = claim(db, now)
    report = commit(db, [ok(s, now) for s in bc], now)
    assert report.enqueued == 1
    assert len(report.applied) == 2
    d = steps_of(db, task)["d"]
    assert d.state == "enqueued"
    enqueued = [t for t in transitions_of(db, d.step_uuid) if t[1] == "enqueued"]
    assert len(enqueued) == 1


# --- commits: failures -------------------------------------------------------------------------


def test_retryable_failure_waits_for_retry(db: Database) -> None:
    now = utcnow()
    task = submit(db, DIAMOND, now)
    (a,) = claim(db, now)
    report = commit(db, [failed(a, now, "handler_error")], now)
    due = now + timedelta(seconds=1)  # base 1000 ms, attempt 1, no jitter
    assert report.next_retry_at == due
    assert report.enqueued == 0
    row = steps_of(db, task)["a"]
    assert (row.state, row.next_attempt_at, row.completed_at, row.results) == (
        "waiting_for_retry",
        due,
        None,
        None,
    )
    assert row.error == {
        "error_type": "handler_error",
        "message": "handler_error happened",
        "retryable": True,
    }
    assert transitions_of(db, a.step_uuid)[-1] == (
        "in_progress",
        "waiting_for_retry",
        1,
        "w1",
        "handler_error",
    )
    (event,) = report.events
    assert event.name == "step.failed"
    assert event.payload["state"] == "waiting_for_retry"
    assert event.payload["error_type"] == "handler_error"
    assert event.payload["next_attempt_at"] == due.isoformat()
    assert {e.name for e in events_of(db, task)} == {"step.failed"}
    assert task_row(db, task).state == "in_progress"
    assert {r.state for n, r in steps_of(db, task).items() if n != "a"} == {"pending"}
    with db.read() as conn:
        assert count_open_work(conn, ["default"]) == 1


def test_retry_after_sets_next_attempt_at(db: Database) -> None:
    now = utcnow()
    task = submit(db, wide(1), now)
    (step,) = claim(db, now)
    report = commit(db, [failed(step, now, "retryable_error", retry_after=90)], now)
    assert steps_of(db, task)["r0"].next_attempt_at == now + timedelta(seconds=90)
    assert steps_of(db, task)["r0"].error["retry_after"] == 90
    assert report.next_retry_at == now + timedelta(seconds=90)


def test_the_earliest_retry_is_reported(db: Database) -> None:
    now = utcnow()
    submit(db, wide(2), now)
    r0, r1 = claim(db, now)
    report = commit(db, [failed(r0, now, retry_after=50), failed(r1, now, retry_after=20)], now)
    assert report.next_retry_at == now + timedelta(seconds=20)


def test_exhausted_attempts_are_an_error(db: Database) -> None:
    now = utcnow()
    task = submit(db, single(max_attempts=2), now)
    (first,) = claim(db, now)
    commit(db, [failed(first, now)], now)
    due = now + timedelta(seconds=1)
    (second,) = claim(db, due)
    report = commit(db, [failed(second, due)], due)
    assert report.next_retry_at is None
    row = steps_of(db, task)["only"]
    assert (row.state, row.attempts, row.next_attempt_at) == ("error", 2, None)
    assert task_row(db, task).state == "error"


def test_non_retryable_step_errors_on_a_retryable_failure(db: Database) -> None:
    now = utcnow()
    task = submit(db, single(retryable=False), now)
    (step,) = claim(db, now)
    assert step.retryable is False
    commit(db, [failed(step, now, "handler_error", retryable=True)], now)
    assert steps_of(db, task)["only"].state == "error"


def test_permanent_failure_errors_the_step_and_the_task(db: Database) -> None:
    now = utcnow()
    task = submit(db, single(), now)
    (step,) = claim(db, now)
    t1 = now + timedelta(seconds=1)
    report = commit(db, [failed(step, now, "permanent_error", retryable=False)], t1)
    row = steps_of(db, task)["only"]
    assert (row.state, row.completed_at, row.next_attempt_at) == ("error", t1, None)
    assert row.error["error_type"] == "permanent_error"
    assert row.error["retryable"] is False
    assert transitions_of(db, step.step_uuid)[-1] == (
        "in_progress",
        "error",
        1,
        "w1",
        "permanent_error",
    )
    assert [e.name for e in report.events] == ["step.failed", "only.failed", "only.audit"]
    assert report.events[0].payload["state"] == "error"
    assert report.events[0].payload["next_attempt_at"] is None
    assert report.events[1].payload["outcome"] == "failure"
    assert Counter(e.name for e in events_of(db, task)) == Counter(
        {"step.failed": 1, "only.failed": 1, "only.audit": 1}
    )
    task_state = task_row(db, task)
    assert (task_state.state, task_state.completed_at) == ("error", t1)
    assert status_of(db, task).execution_status == "blocked_by_failures"
    with db.read() as conn:
        assert count_open_work(conn, ["default"]) == 0


def test_failed_root_of_a_dag_errors_the_task(db: Database) -> None:
    now = utcnow()
    task = submit(db, DIAMOND, now)
    (a,) = claim(db, now)
    commit(db, [failed(a, now, "permanent_error", retryable=False)], now)
    assert {n: r.state for n, r in steps_of(db, task).items()} == {
        "a": "error",
        "b": "pending",
        "c": "pending",
        "d": "pending",
    }
    assert task_row(db, task).state == "error"


def test_task_is_not_an_error_while_other_steps_can_still_run(db: Database) -> None:
    now = utcnow()
    task = submit(db, wide(2), now)
    r0, r1 = claim(db, now)
    commit(db, [failed(r0, now, "permanent_error", retryable=False)], now)
    assert task_row(db, task).state == "in_progress"
    # With parallel steps a failure and a running step coexist; the failure wins.
    assert status_of(db, task).execution_status == "blocked_by_failures"
    commit(db, [ok(r1, now)], now)
    assert task_row(db, task).state == "error"


# --- commits: the guard ------------------------------------------------------------------------


def test_a_duplicate_outcome_is_rejected(db: Database) -> None:
    now = utcnow()
    task = submit(db, DIAMOND, now)
    (a,) = claim(db, now)
    outcome = ok(a, now, {"n": 1}, (EmittedEvent("once", {}),))
    assert commit(db, [outcome], now).applied == [outcome]
    transitions_before = transitions_of(db, a.step_uuid)
    events_before = len(events_of(db, task))
    again = commit(db, [outcome], now + timedelta(seconds=1))
    assert again.applied == []
    assert again.rejected == [outcome]
    assert again.events == []
    assert again.enqueued == 0
    assert transitions_of(db, a.step_uuid) == transitions_before
    assert len(events_of(db, task)) == events_before
    assert steps_of(db, task)["a"].completed_at == now


def test_a_duplicate_within_one_batch_is_applied_once(db: Database) -> None:
    now = utcnow()
    task = submit(db, wide(1), now)
    (step,) = claim(db, now)
    first, second = ok(step, now, {"v": 1}), ok(step, now, {"v": 2})
    report = commit(db, [first, second], now)
    assert report.applied == [first]
    assert report.rejected == [second]
    assert steps_of(db, task)["r0"].results == {"v": 1}
    assert Counter(e.name for e in events_of(db, task)) == Counter({"step.completed": 1})


def test_a_late_outcome_after_the_step_was_reclaimed_is_rejected(db: Database) -> None:
    now = utcnow()
    task = submit(db, wide(1), now)
    (attempt1,) = claim(db, now)
    # Attempt 1 times out; its timeout result is committed and the step is retried.
    commit(db, [failed(attempt1, now, HANDLER_TIMEOUT)], now)
    due = now + timedelta(seconds=1)
    (attempt2,) = claim(db, due, worker="w1")
    assert attempt2.attempt == 2
    # The stuck thread of attempt 1 finally returns a success: rejected.
    late = ok(attempt1, due, {"late": True})
    report = commit(db, [late], due)
    assert report.rejected == [late]
    row = steps_of(db, task)["r0"]
    assert (row.state, row.attempts, row.results) == ("in_progress", 2, None)
    # Attempt 2's own result still lands.
    assert commit(db, [ok(attempt2, due, {"on_time": True})], due).applied
    assert steps_of(db, task)["r0"].results == {"on_time": True}


def test_an_outcome_from_another_claimant_is_rejected(db: Database) -> None:
    now = utcnow()
    task = submit(db, wide(1), now)
    (step,) = claim(db, now, worker="w1")
    impostor = ok(dataclasses.replace(step, claimed_by="w2"), now)
    report = commit(db, [impostor], now)
    assert report.rejected == [impostor]
    row = steps_of(db, task)["r0"]
    assert (row.state, row.claimed_by) == ("in_progress", "w1")
    assert events_of(db, task) == []


def test_an_outcome_for_a_released_claim_is_rejected(db: Database) -> None:
    now = utcnow()
    task = submit(db, wide(1), now)
    (step,) = claim(db, now)
    with db.write() as conn:
        release_claims(conn, [step], worker_id="w1", now=now, reason="shutdown")
    report = commit(db, [ok(step, now)], now)
    assert report.applied == []
    assert steps_of(db, task)["r0"].state == "enqueued"


# --- release_claims ----------------------------------------------------------------------------


def test_release_claims_restores_enqueued_and_the_attempt_count(db: Database) -> None:
    now = utcnow()
    task = submit(db, wide(2), now)
    claimed = claim(db, now, worker="w1")
    t1 = now + timedelta(seconds=1)
    with db.write() as conn:
        assert release_claims(conn, claimed, worker_id="w1", now=t1, reason="shutdown") == 2
    for row in steps_of(db, task).values():
        assert (row.state, row.attempts, row.claimed_by, row.claimed_at) == (
            "enqueued",
            0,
            None,
            None,
        )
        assert row.next_attempt_at == t1
        assert transitions_of(db, row.step_uuid)[-1] == (
            "in_progress",
            "enqueued",
            0,
            "w1",
            "shutdown",
        )
    again = claim(db, t1, worker="w2")
    assert sorted(s.attempt for s in again) == [1, 1]
    with db.read() as conn:
        assert count_open_work(conn, ["default"]) == 2


def test_release_of_a_retry_claim_restores_the_previous_attempt_count(db: Database) -> None:
    now = utcnow()
    task = submit(db, wide(1), now)
    (first,) = claim(db, now)
    commit(db, [failed(first, now)], now)
    due = now + timedelta(seconds=1)
    (second,) = claim(db, due)
    with db.write() as conn:
        assert release_claims(conn, [second], worker_id="w1", now=due, reason="shutdown") == 1
    row = steps_of(db, task)["r0"]
    assert (row.state, row.attempts) == ("enqueued", 1)
    (third,) = claim(db, due)
    assert third.attempt == 2


def test_release_claims_is_guarded(db: Database) -> None:
    now = utcnow()
    task = submit(db, wide(2), now)
    r0, r1 = claim(db, now, worker="w1")
    commit(db, [ok(r1, now)], now)
    with db.write() as conn:
        # Another worker's claim, a stale attempt, and a step already finished: all left alone.
        assert release_claims(conn, [r0], worker_id="w2", now=now, reason="x") == 0
        stale = dataclasses.replace(r0, attempt=5)
        assert release_claims(conn, [stale], worker_id="w1", now=now, reason="x") == 0
        assert release_claims(conn, [r1], worker_id="w1", now=now, reason="x") == 0
    rows = steps_of(db, task)
    assert (rows["r0"].state, rows["r0"].attempts) == ("in_progress", 1)
    assert rows["r1"].state == "complete"


# --- recover_lost_claims ----------------------------------------------------------------------


def test_recover_lost_claims_of_dead_workers_only(db: Database) -> None:
    t0 = utcnow()
    timeout = timedelta(seconds=30)
    recover_at = t0 + timedelta(seconds=5)
    task = submit(db, wide(6), t0)
    add_worker(db, "live", heartbeat_at=recover_at - timedelta(seconds=1))
    add_worker(db, "dead", heartbeat_at=recover_at - timeout - timedelta(seconds=1))
    add_worker(db, "stopped", heartbeat_at=recover_at, stopped_at=recover_at)
    add_worker(db, "exited", heartbeat_at=recover_at)  # fresh heartbeat, process gone
    # The recovering worker itself, silent for long: it never recovers its own claims.
    add_worker(db, "recoverer", heartbeat_at=t0 - timedelta(hours=1))
    claims: dict[str, ClaimedStep] = {}
    for worker in ("live", "dead", "stopped", "exited", "ghost", "recoverer"):
        # Claims are only seconds old: liveness alone decides, not the claim's age.
        (step,) = claim(db, t0, worker=worker, limit=1)
        claims[worker] = step
    with db.write() as conn:
        # Make the ghost's attempt its last: recovering it is an error, not a retry.
        conn.execute(
            workflow_steps.update()
            .where(workflow_steps.c.step_uuid == claims["ghost"].step_uuid)
            .values(max_attempts=1)
        )

    def recover() -> CommitReport:
        with db.write() as conn:
            return recover_lost_claims(
                conn,
                me="recoverer",
                heartbeat_cutoff=recover_at - timeout,
                now=recover_at,
                policy=POLICY,
                rng=random.Random(0),
                dead_workers=["exited"],
            )

    report = recover()
    lost = ("dead", "stopped", "exited", "ghost")
    recovered = {o.step.step_uuid for o in report.applied}
    assert recovered == {claims[w].step_uuid for w in lost}
    assert all(
        o.failure is not None and o.failure.error_type == WORKER_LOST for o in report.applied
    )
    rows = {r.step_uuid: r for r in steps_of(db, task).values()}
    for worker in ("live", "recoverer"):
        assert rows[claims[worker].step_uuid].state == "in_progress"
        assert rows[claims[worker].step_uuid].claimed_by == worker
    for worker in lost:
        row = rows[claims[worker].step_uuid]
        expected = "error" if worker == "ghost" else "waiting_for_retry"
        assert row.state == expected
        assert row.error["error_type"] == WORKER_LOST
        assert transitions_of(db, row.step_uuid)[-1][:4] == ("in_progress", expected, 1, worker)
    assert Counter(e.name for e in report.events) == Counter({"step.failed": 4})

    # The lost worker's result turns up after all: rejected.
    late = ok(claims["dead"], recover_at)
    assert commit(db, [late], recover_at).rejected == [late]
    # Recovering again finds nothing new: each lost attempt is recorded once.
    assert recover().applied == []


def test_dead_local_workers_are_those_whose_process_is_gone(db: Database) -> None:
    now = utcnow()
    fresh = now - timedelta(seconds=1)
    for worker_id, pid in (("alive", 100), ("gone", 200), ("me", 300)):
        add_worker(db, worker_id, heartbeat_at=fresh)
        with db.write() as conn:
            conn.execute(workers.update().where(workers.c.worker_id == worker_id).values(pid=pid))
    add_worker(db, "stale", heartbeat_at=now - timedelta(hours=1))  # dead by SQL already
    add_worker(db, "done", heartbeat_at=fresh, stopped_at=fresh)
    with db.read() as conn:
        dead = dead_local_workers(
            conn,
            hostname=WORKER_HOST,
            me="me",
            heartbeat_cutoff=now - timedelta(seconds=30),
            alive=lambda pid: pid != 200,
        )
        elsewhere = dead_local_workers(
            conn,
            hostname="other-host",
            me="me",
            heartbeat_cutoff=now - timedelta(seconds=30),
            alive=lambda pid: False,
        )
    assert dead == ["gone"]
    assert elsewhere == []


def test_a_dead_worker_with_this_processs_pid_is_one_from_an_earlier_process(
    db: Database,
) -> None:
    """A container's PID 1 restarted on the same host: same pid, earlier start."""
    now = utcnow()
    for worker_id, started in (
        ("earlier", PROCESS_STARTED_AT - timedelta(seconds=5)),
        ("sibling", PROCESS_STARTED_AT + timedelta(microseconds=1)),  # a Worker in this process
    ):
        add_worker(db, worker_id, heartbeat_at=now)
        with db.write() as conn:
            conn.execute(
                workers.update()
                .where(workers.c.worker_id == worker_id)
                .values(pid=os.getpid(), started_at=started)
            )
    with db.read() as conn:
        dead = dead_local_workers(
            conn, hostname=WORKER_HOST, me="me", heartbeat_cutoff=now - timedelta(seconds=30)
        )
    assert dead == ["earlier"]


def test_process_exists() -> None:
    assert process_exists(os.getpid())
    child = processes.current().popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not process_exists(child.pid)
    assert not process_exists(0)


def test_recover_lost_claims_with_nothing_to_recover(db: Database) -> None:
    now = utcnow()
    submit(db, wide(1), now)
    with db.write() as conn:
        report = recover_lost_claims(
            conn,
            me="recoverer",
            heartbeat_cutoff=now - timedelta(seconds=1),
            now=now,
            policy=POLICY,
            rng=random.Random(0),
        )
    assert (report.applied, report.rejected, report.events) == ([], [], [])


def test_one_claim_across_tasks_gives_each_step_its_own_task(db: Database) -> None:
    t0 = utcnow()
    first = submit(db, DIAMOND, t0, {"n": 1})
    second = submit(db, wide(3), t0, {"n": 2})
    (started,) = [s for s in claim(db, t0, limit=1) if s.task_uuid == first]
    with db.write() as conn:
        commit_outcomes(conn, [ok(started, t0)], policy=POLICY, now=t0, rng=random.Random(0))
    claimed = claim(db, t0 + timedelta(seconds=1), limit=10)
    assert {s.task_uuid for s in claimed} == {first, second}
    for step in claimed:
        assert step.task_context == {"n": 1 if step.task_uuid == first else 2}
        parents = DIAMOND_PARENTS.get(step.name, set()) if step.task_uuid == first else set()
        assert set(step.dependency_results) == parents
    with db.read() as conn:
        states = dict(conn.execute(select(tasks.c.task_uuid, tasks.c.state)).all())
    assert states == {first: "in_progress", second: "in_progress"}


# --- release_unconfirmed_claim -----------------------------------------------------------------


def test_release_unconfirmed_claim_hands_back_exactly_that_claim(db: Database) -> None:
    t0 = utcnow()
    task = submit(db, wide(4), t0)
    lost = claim(db, t0, limit=2)  # committed, but the worker never heard of it
    kept = claim(db, t0 + timedelta(seconds=1), limit=1)
    other = claim(db, t0, worker="w2", limit=1)
    with db.write() as conn:
        released = release_unconfirmed_claim(
            conn, worker_id="w1", claimed_at=t0, now=t0 + timedelta(seconds=2)
        )
    assert released == 2
    rows = {r.step_uuid: r for r in steps_of(db, task).values()}
    for step in lost:
        assert (rows[step.step_uuid].state, rows[step.step_uuid].attempts) == ("enqueued", 0)
        assert transitions_of(db, step.step_uuid)[-1][:3] == ("in_progress", "enqueued", 0)
    for step in (*kept, *other):
        assert rows[step.step_uuid].state == "in_progress"
    with db.write() as conn:  # nothing is handed back twice
        assert release_unconfirmed_claim(conn, worker_id="w1", claimed_at=t0, now=t0) == 0


# --- count_open_work ---------------------------------------------------------------------------


def test_count_open_work(db: Database) -> None:
    now = utcnow()

    def open_work(*namespaces: str) -> int:
        with db.read() as conn:
            return count_open_work(conn, list(namespaces))

    assert open_work("default") == 0
    submit(db, DIAMOND, now)  # a enqueued; b, c, d pending (not open: they wait on a)
    submit(db, wide(2, namespace="other"), now)
    assert open_work("default") == 1
    assert open_work("other") == 2
    assert open_work("default", "other") == 3
    assert open_work("nowhere") == 0
    (a,) = claim(db, now)
    assert open_work("default") == 1  # in progress
    commit(db, [failed(a, now)], now)
    assert open_work("default") == 1  # waiting for retry
    (a2,) = claim(db, now + timedelta(seconds=1))
    commit(db, [ok(a2, now)], now)
    assert open_work("default") == 2  # b and c enqueued
    for step in claim(db, now):
        commit(db, [failed(step, now, "permanent_error", retryable=False)], now)
    assert open_work("default") == 0  # errors and blocked pending steps are not open work
    assert open_work("other") == 2


def test_the_liveness_rule_agrees_between_sql_and_the_verdict(db: Database) -> None:
    """``duplex status`` (rows picked in SQL) and ``duplex workers`` (a verdict per row) apply
    one rule."""
    now = utcnow()
    fresh, stale = now - timedelta(seconds=1), now - timedelta(seconds=31)
    add_worker(db, "beating", heartbeat_at=fresh)
    add_worker(db, "silent", heartbeat_at=stale)
    add_worker(db, "done", heartbeat_at=fresh, stopped_at=fresh)
    with db.read() as conn:
        listed = {row["worker_id"] for row, _ in alive_workers(conn, claim_timeout_s=30, now=now)}
        verdicts = {
            row["worker_id"]: verdict.state
            for row, verdict in judged_workers(conn, claim_timeout_s=30, now=now)
        }
    assert listed == {"beating"}
    assert verdicts == {"beating": "alive", "silent": "presumed dead", "done": "stopped"}


def test_a_process_is_gone_by_one_same_host_rule() -> None:
    earlier = PROCESS_STARTED_AT - timedelta(seconds=5)
    assert not process_gone(None, earlier)
    assert process_gone(4242, earlier, alive=lambda pid: False)
    assert not process_gone(4242, earlier, alive=lambda pid: True)
    # This process's pid: gone only for a row of an earlier process with the same pid.
    assert process_gone(os.getpid(), earlier)
    assert not process_gone(os.getpid(), PROCESS_STARTED_AT + timedelta(seconds=1))
    verdict = judge(
        hostname="here",
        pid=os.getpid(),
        heartbeat_at=utcnow(),
        stopped_at=None,
        now=utcnow(),
        claim_timeout_s=30,
        this_host="here",
        started_at=earlier,
    )
    assert (verdict.state, verdict.why) == ("presumed dead", f"process {os.getpid()} is gone")
