"""Random workflows through the real Worker actors on SQLite (hypothesis).

Each example draws a DAG of up to 30 steps (random fan-in and fan-out, listed in a random
order), an outcome per step, and a concurrency of 1-8, then runs the task with a real
``Worker`` until it is finished. One handler serves every step; it records each run (which
step, which attempt, a global start/end sequence number, the parents' results it was given)
and acts out the step's outcome:

- ``ok``: succeeds;
- ``fail``: ``PermanentError``, so the step is in error after one attempt;
- ``flaky``: ``RetryableError`` on attempt 1, success on attempt 2;
- ``exhaust``: ``RetryableError`` on every attempt, so the step is in error after 2 attempts;
- ``crash``: a plain exception (``handler_error``) on its only allowed attempt.

A reference model (a step runs iff all its parents succeed) then gives the expected runs,
step states, task state and execution status.

Two PostgreSQL tests pin down the races READ COMMITTED allows between transactions of one
task (two last parents committed at once; a result committed during ``duplex cancel``): the
second transaction is held open until the first one waits on its lock, so the interleaving is
forced, not hoped for.
"""

from __future__ import annotations

import itertools
import random
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, select, text

from duplex.clock import utcnow
from duplex.commit.retry import RetryPolicy
from duplex.errors import PermanentError, RetryableError
from duplex.handlers import HandlerRegistry, StepContext
from duplex.messages import ClaimedStep, StepFailure, StepOutcome
from duplex.states import TASK_FINISHED, is_legal_step_transition
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.models import tasks, workflow_step_transitions, workflow_steps
from duplex.storage.operations import cancel_task
from duplex.storage.queries import get_task
from duplex.storage.results import CommitReport, commit_outcomes
from duplex.storage.submission import create_task
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import TaskTemplate
from duplex.worker.wiring import Worker
from tests.conftest import make_settings, sqlite_database

# "ok" first: hypothesis shrinks towards it, so a failing example shrinks to few failures.
OUTCOMES = ("ok", "fail", "flaky", "exhaust", "crash")
SUCCEEDS = {"ok": True, "fail": False, "flaky": True, "exhaust": False, "crash": False}
ATTEMPTS = {"ok": 1, "fail": 1, "flaky": 2, "exhaust": 2, "crash": 1}
MAX_ATTEMPTS = {"ok": 3, "fail": 3, "flaky": 2, "exhaust": 2, "crash": 1}
WAIT_S = 60.0


@dataclass(frozen=True)
class Workflow:
    parents: tuple[tuple[int, ...], ...]  # parents[i]: indices < i
    outcomes: tuple[str, ...]
    listing: tuple[int, ...]  # the order the steps appear in the template
    concurrency: int

    def name(self, i: int) -> str:
        return f"s{i:02d}"

    def template(self, namespace: str) -> TaskTemplate:
        steps = [
            {
                "name": self.name(i),
                "handler": "prop.run",
                "depends_on": [self.name(p) for p in self.parents[i]],
                "max_attempts": MAX_ATTEMPTS[self.outcomes[i]],
                "inputs": {"outcome": self.outcomes[i]},
            }
            for i in self.listing
        ]
        return TaskTemplate.model_validate(
            {"name": "property", "namespace": namespace, "steps": steps}
        )

    def runs(self) -> list[bool]:
        """Which steps run: those whose parents all (eventually) succeed."""
        runs: list[bool] = []
        for parents in self.parents:
            runs.append(all(runs[p] and SUCCEEDS[self.outcomes[p]] for p in parents))
        return runs


@st.composite
def workflows(draw: st.DrawFn) -> Workflow:
    n = draw(st.integers(1, 30))
    parents: list[tuple[int, ...]] = []
    for i in range(n):
        if i == 0:
            parents.append(())
            continue
        # Fan-in of 0-5; fan-out follows from many steps picking the same parent.
        chosen = draw(st.lists(st.integers(0, i - 1), max_size=min(i, 5), unique=True))
        parents.append(tuple(sorted(chosen)))
    weights = st.sampled_from(OUTCOMES[:1] * 6 + OUTCOMES[1:])
    outcomes = tuple(draw(st.lists(weights, min_size=n, max_size=n)))
    listing = tuple(draw(st.permutations(range(n))))
    concurrency = draw(st.integers(1, 8))
    return Workflow(tuple(parents), outcomes, listing, concurrency)


@dataclass
class Run:
    step: str
    attempt: int
    start: int
    end: int = -1
    token: str = ""
    succeeded: bool = False
    given: dict[str, Any] = field(default_factory=dict)


class Recorder:
    """The handler, and what it saw. Thread-safe: handlers run on the pool's threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sequence = itertools.count()
        self.runs: list[Run] = []
        self.running = 0
        self.peak = 0

    def __call__(self, ctx: StepContext) -> dict[str, Any]:
        with self.lock:
            run = Run(ctx.step_name, ctx.attempt, next(self.sequence))
            run.given = dict(ctx.dependency_results)
            self.runs.append(run)
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(0.001 * (hash(ctx.step_uuid) % 3))  # let the runs overlap a little
            outcome = ctx.inputs["outcome"]
            if outcome == "fail":
                raise PermanentError("fails for good")
            if outcome == "crash":
                raise ValueError("a bug in the handler")
            if outcome == "exhaust" or (outcome == "flaky" and ctx.attempt == 1):
                raise RetryableError("try again", retry_after=0)
            run.token = uuid.uuid4().hex
            run.succeeded = True
            return {"step": ctx.step_name, "token": run.token}
        finally:
            with self.lock:
                run.end = next(self.sequence)
                self.running -= 1


def run_workflow(db: Database, workflow: Workflow) -> tuple[str, Recorder, dict[str, Any]]:
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    recorder = Recorder()
    registry = HandlerRegistry()
    registry.register("prop.run", recorder)
    settings_ = make_settings(
        str(db.url),
        worker={
            "namespaces": [namespace],
            "max_concurrent_handlers": workflow.concurrency,
            "prefetch": 2,
        },
        event_system={"polling_interval_ms": 20},
        retry={"backoff_base_ms": 0, "jitter": 0.0},
    )
    with db.write() as conn:
        task_uuid = create_task(conn, workflow.template(namespace), {}, now=utcnow())
    worker = Worker(settings_, db, registry=registry, subscribers=SubscriberRegistry())
    worker.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            with db.read() as conn:
                state = conn.execute(
                    select(tasks.c.state).where(tasks.c.task_uuid == task_uuid)
                ).scalar_one()
            if state in TASK_FINISHED:
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"task still {state} after {WAIT_S}s")
    finally:
        final = worker.stop()
    return task_uuid, recorder, final


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(workflow=workflows())
def test_random_workflows_follow_the_dependency_rules(workflow: Workflow) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite_database(Path(tmp) / "prop.db")
        try:
            task_uuid, recorder, final = run_workflow(db, workflow)
            check(db, workflow, task_uuid, recorder)
            # Eager dispatch: a commit that makes a step ready claims it (one per parent).
            made_ready = any(
                runs and parents
                for runs, parents in zip(workflow.runs(), workflow.parents, strict=True)
            )
            assert (final["completion"]["claimed_eagerly"] > 0) == made_ready
        finally:
            db.dispose()


def check(db: Database, workflow: Workflow, task_uuid: str, recorder: Recorder) -> None:
    n = len(workflow.parents)
    expected_runs = workflow.runs()
    by_step: dict[str, list[Run]] = {}
    for run in recorder.runs:
        by_step.setdefault(run.step, []).append(run)

    # Bounded parallelism, as a sanity check of the setting.
    assert recorder.peak <= workflow.concurrency

    for i in range(n):
        name, outcome = workflow.name(i), workflow.outcomes[i]
        runs = by_step.get(name, [])
        attempts = [r.attempt for r in runs]
        if not expected_runs[i]:
            # A dependent of a failed step never runs.
            assert runs == [], f"{name} ran although a parent failed"
            continue
        # No step runs twice: each attempt once, attempts in order, as many as the outcome needs.
        assert attempts == list(range(1, ATTEMPTS[outcome] + 1)), (name, outcome, attempts)
        for run in runs:
            assert sorted(run.given) == sorted(workflow.name(p) for p in workflow.parents[i])
            for p in workflow.parents[i]:
                successes = [r for r in by_step.get(workflow.name(p), []) if r.succeeded]
                assert len(successes) == 1, (name, "ran before", workflow.name(p), "succeeded")
                parent_run = successes[0]
                # Every step runs only after all its parents completed: the parent's handler
                # ended first, and its committed result is what the child was given.
                assert parent_run.end < run.start, (name, workflow.name(p))
                assert run.given[workflow.name(p)].get("token") == parent_run.token

    with db.read() as conn:
        rows = {
            r.name: r
            for r in conn.execute(
                select(workflow_steps).where(workflow_steps.c.task_uuid == task_uuid)
            )
        }
        transitions = conn.execute(
            select(workflow_step_transitions)
            .join(
                workflow_steps,
                workflow_steps.c.step_uuid == workflow_step_transitions.c.step_uuid,
            )
            .where(workflow_steps.c.task_uuid == task_uuid)
            .order_by(workflow_step_transitions.c.id)
        ).all()
        summary = get_task(conn, task_uuid)

    for i in range(n):
        name, outcome = workflow.name(i), workflow.outcomes[i]
        row = rows[name]
        if not expected_runs[i]:
            assert (row.state, row.attempts) == ("pending", 0), name
        elif SUCCEEDS[outcome]:
            assert (row.state, row.attempts) == ("complete", ATTEMPTS[outcome]), name
            assert row.results["token"] == by_step[name][-1].token
        else:
            assert (row.state, row.attempts) == ("error", ATTEMPTS[outcome]), name

    last: dict[str, str | None] = {}
    for move in transitions:
        assert move.from_state == last.get(move.step_uuid), move
        assert is_legal_step_transition(move.from_state, move.to_state), move
        last[move.step_uuid] = move.to_state
    assert {r.step_uuid: r.state for r in rows.values()} == last

    everything_succeeds = all(expected_runs[i] and SUCCEEDS[workflow.outcomes[i]] for i in range(n))
    if everything_succeeds:
        assert (summary.state, summary.execution_status) == ("complete", "all_complete")
    else:
        assert (summary.state, summary.execution_status) == ("error", "blocked_by_failures")
    assert summary.completed_at is not None


# --- PostgreSQL: concurrent commits of one task -------------------------------------------

FAN_IN = """
name = "fan_in"
[[steps]]
name = "p"
handler = "t.h"
[[steps]]
name = "q"
handler = "t.h"
[[steps]]
name = "d"
handler = "t.h"
depends_on = ["p", "q"]
"""


def _commit_while_another_transaction_is_open(
    db: Database,
    first: Callable[[Connection], None],
    second: Callable[[Connection], None],
) -> None:
    """Run ``first`` in an open transaction, start ``second`` in another one, and commit
    ``first`` only once ``second`` has either finished or is waiting for a lock."""
    second_pid: list[int] = []
    errors: list[BaseException] = []

    def run_second() -> None:
        try:
            with db.write() as conn:
                second_pid.append(int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one()))
                second(conn)
        except BaseException as exc:
            errors.append(exc)

    transaction = db.write()
    conn = transaction.__enter__()
    try:
        first(conn)
        thread = threading.Thread(target=run_second)
        thread.start()
        deadline = time.monotonic() + WAIT_S
        while thread.is_alive() and time.monotonic() < deadline:
            if second_pid:
                with db.read() as probe:
                    waiting = probe.execute(
                        text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"),
                        {"pid": second_pid[0]},
                    ).scalar_one_or_none()
                if waiting == "Lock":
                    break
            time.sleep(0.01)
    finally:
        transaction.__exit__(None, None, None)
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert not errors, errors


def _fan_in_claimed(db: Database) -> tuple[str, dict[str, ClaimedStep]]:
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    template = TaskTemplate.model_validate({**tomllib.loads(FAN_IN), "namespace": namespace})
    with db.write() as conn:
        task_uuid = create_task(conn, template, {}, now=utcnow())
    with db.write() as conn:
        claimed = claim_ready_steps(
            conn, worker_id="w", namespaces=[namespace], limit=10, now=utcnow()
        )
    return task_uuid, {step.name: step for step in claimed}


def _outcome(step: ClaimedStep, *, retryable_failure: bool = False) -> StepOutcome:
    now = utcnow()
    if retryable_failure:
        return StepOutcome(step, now, now, failure=StepFailure("retryable_error", "x", True))
    return StepOutcome(step, now, now, result={"from": step.name})


def _states(db: Database, task_uuid: str) -> dict[str, str]:
    with db.read() as conn:
        return dict(
            conn.execute(
                select(workflow_steps.c.name, workflow_steps.c.state).where(
                    workflow_steps.c.task_uuid == task_uuid
                )
            ).all()
        )


def test_the_last_two_parents_committed_at_once_enqueue_the_child(postgres_db: Database) -> None:
    """Two workers commit p and q at the same moment: whichever commits second must see the
    other parent complete (under READ COMMITTED it would not, without the task lock)."""
    db = postgres_db
    task_uuid, steps = _fan_in_claimed(db)
    policy, rng = RetryPolicy(), random.Random(0)
    reports: list[CommitReport] = []

    def commit(name: str) -> Callable[[Connection], None]:
        def run(conn: Connection) -> None:
            reports.append(
                commit_outcomes(conn, [_outcome(steps[name])], policy=policy, now=utcnow(), rng=rng)
            )

        return run

    _commit_while_another_transaction_is_open(db, commit("p"), commit("q"))
    assert _states(db, task_uuid) == {"p": "complete", "q": "complete", "d": "enqueued"}
    assert sum(report.enqueued for report in reports) == 1


def test_a_result_racing_a_cancel_does_not_schedule_a_retry(postgres_db: Database) -> None:
    """``duplex cancel`` holds the task while a worker commits a retryable failure: the
    failure is recorded once the cancel commits, and no retry is scheduled."""
    db = postgres_db
    task_uuid, steps = _fan_in_claimed(db)

    def cancel(conn: Connection) -> None:
        cancel_task(conn, task_uuid, operator="operator:test", now=utcnow())

    def fail(conn: Connection) -> None:
        commit_outcomes(
            conn,
            [_outcome(steps["p"], retryable_failure=True), _outcome(steps["q"])],
            policy=RetryPolicy(base_ms=0),
            now=utcnow(),
            rng=random.Random(0),
        )

    _commit_while_another_transaction_is_open(db, cancel, fail)
    assert _states(db, task_uuid) == {"p": "cancelled", "q": "complete", "d": "cancelled"}
