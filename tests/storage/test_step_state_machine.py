"""A stateful hypothesis test of the step state machine against a real SQLite database.

Hypothesis interleaves every code path that changes a step's state: ``create_task``,
``claim_ready_steps`` (two workers), ``commit_outcomes`` with success, retryable and permanent
outcomes (for live claims and for claims already settled, which the guard must reject), a
commit of a worker's successes that claims dependents it made ready in its transaction
(``claim_dependents``, eager dispatch), ``release_claims``, ``recover_lost_claims``, and the
operator commands ``cancel_task``, ``retry_step`` and ``resolve_step`` (on any step, so
refusals are exercised too). Time is a fake clock that the test moves, so retries come due
when hypothesis decides.

Invariants, checked after every rule:
- every transition row is a legal move of ``duplex.states.STEP_TRANSITIONS`` (creation rows go
  from NULL to pending or enqueued), each row starts where the previous one ended, and the
  step's state equals its last row's ``to_state``;
- no step runs ahead of its parents: a step past ``pending`` has every parent complete or
  resolved, unless an operator settled the step or its task was cancelled;
- a task's stored state is what ``derive_task_state`` makes of its steps (cancelled sticks);
- a step in progress carries its claim: claimant and attempt, as its claim row says.
"""

from __future__ import annotations

import random
import tempfile
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from sqlalchemy import func, select

from duplex.commit.retry import RetryPolicy
from duplex.errors import TransitionError
from duplex.messages import ClaimedStep, StepFailure, StepOutcome
from duplex.states import (
    CANCELLED,
    DONE,
    PENDING,
    RESOLVED_MANUALLY,
    derive_task_state,
    is_legal_step_transition,
)
from duplex.storage.claims import claim_dependents, claim_ready_steps
from duplex.storage.models import (
    tasks,
    workflow_step_edges,
    workflow_step_transitions,
    workflow_steps,
)
from duplex.storage.operations import cancel_task, resolve_step, retry_step
from duplex.storage.recovery import recover_lost_claims
from duplex.storage.releases import release_claims
from duplex.storage.results import commit_outcomes
from duplex.storage.submission import create_task
from duplex.templates import TaskTemplate
from tests.conftest import sqlite_database

NAMESPACE = "default"
WORKERS = ("w1", "w2")
OPERATOR = "operator:machine"


@st.composite
def small_dags(draw: st.DrawFn) -> TaskTemplate:
    """A template of 1-5 steps with random dependencies and attempt limits."""
    n = draw(st.integers(1, 5))
    steps = []
    for i in range(n):
        parents = draw(st.sets(st.integers(0, i - 1), max_size=i)) if i else set()
        steps.append(
            {
                "name": f"s{i}",
                "handler": "t.h",
                "depends_on": [f"s{p}" for p in sorted(parents)],
                "max_attempts": draw(st.integers(1, 3)),
                "retryable": draw(st.booleans()),
            }
        )
    return TaskTemplate.model_validate({"name": "machine", "steps": steps})


class StepStateMachine(RuleBasedStateMachine):
    task_ids = Bundle("task_ids")

    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory()
        self.db = sqlite_database(Path(self._tmp.name) / "machine.db")
        self.now = datetime(2030, 1, 1, tzinfo=UTC)
        self.policy = RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=8000, jitter=0.5)
        self.rng = random.Random(0)
        # Every claim ever made, settled or not: committing a settled one tests the guard.
        self.claims: list[ClaimedStep] = []
        # Steps in creation order: draws must not depend on the (random) uuids, or hypothesis
        # cannot replay an example.
        self.step_uuids: list[str] = []

    def teardown(self) -> None:
        self.db.dispose()
        self._tmp.cleanup()

    # --- rules: the code paths that move steps ---------------------------------------

    @initialize(target=task_ids, template=small_dags())
    def first_task(self, template: TaskTemplate) -> str:
        return self._create(template)

    @rule(target=task_ids, template=small_dags())
    def create(self, template: TaskTemplate) -> str:
        return self._create(template)

    @rule(worker=st.sampled_from(WORKERS), limit=st.integers(1, 4))
    def claim(self, worker: str, limit: int) -> None:
        with self.db.write() as conn:
            claimed = claim_ready_steps(
                conn, worker_id=worker, namespaces=[NAMESPACE], limit=limit, now=self.now
            )
        self.claims.extend(claimed)

    @precondition(lambda self: bool(self.claims))
    @rule(
        data=st.data(),
        kind=st.sampled_from(["success", "retryable", "permanent"]),
        retry_after=st.none() | st.floats(0, 5),
    )
    def commit(self, data: st.DataObject, kind: str, retry_after: float | None) -> None:
        steps = data.draw(st.lists(st.sampled_from(self.claims), min_size=1, max_size=3))
        outcomes = []
        for step in steps:
            if kind == "success":
                outcome = StepOutcome(step, self.now, self.now, result={"by": step.claimed_by})
            else:
                failure = StepFailure(
                    f"{kind}_error", "boom", kind == "retryable", retry_after=retry_after
                )
                outcome = StepOutcome(step, self.now, self.now, failure=failure)
            outcomes.append(outcome)
        with self.db.write() as conn:
            report = commit_outcomes(conn, outcomes, policy=self.policy, now=self.now, rng=self.rng)
        # A claim settles at most once, whatever else is in the batch.
        applied = Counter((o.step.step_uuid, o.step.attempt) for o in report.applied)
        assert all(n == 1 for n in applied.values())

    @rule(worker=st.sampled_from(WORKERS), limit=st.integers(1, 3))
    def finish_and_carry_on(self, worker: str, limit: int) -> None:
        # A worker's live claims (or one it takes from the queue) succeed, and their commit
        # claims dependents it made ready, in its transaction: workflows get far this way.
        mine = [c for c in self._live_claims() if c.claimed_by == worker][:3]
        if not mine:
            with self.db.write() as conn:
                mine = claim_ready_steps(
                    conn, worker_id=worker, namespaces=[NAMESPACE], limit=1, now=self.now
                )
            self.claims += mine
        outcomes = [StepOutcome(c, self.now, self.now, result={"by": worker}) for c in mine]
        with self.db.write() as conn:
            report = commit_outcomes(conn, outcomes, policy=self.policy, now=self.now, rng=self.rng)
            self.claims += claim_dependents(
                conn,
                report.ready,
                worker_id=worker,
                namespaces=[NAMESPACE],
                limit=limit,
                now=self.now,
            )

    @precondition(lambda self: bool(self.claims))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        step = data.draw(st.sampled_from(self.claims))
        with self.db.write() as conn:
            release_claims(conn, [step], worker_id=step.claimed_by, now=self.now, reason="stopping")

    @rule()
    def recover_stale(self) -> None:
        # No worker heartbeats here, so every claim older than the timeout is stale.
        with self.db.write() as conn:
            recover_lost_claims(
                conn,
                me="recoverer",
                heartbeat_cutoff=self.now - timedelta(seconds=30),
                now=self.now,
                policy=self.policy,
                rng=self.rng,
            )

    @rule(seconds=st.sampled_from([1, 5, 60]))
    def advance_time(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @rule(task_uuid=task_ids, reason=st.none() | st.text(max_size=10))
    def cancel(self, task_uuid: str, reason: str | None) -> None:
        self._operate(cancel_task, task_uuid, reason)

    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        self._operate(retry_step, data.draw(st.sampled_from(self._step_uuids())), None)

    @rule(data=st.data())
    def resolve(self, data: st.DataObject) -> None:
        self._operate(resolve_step, data.draw(st.sampled_from(self._step_uuids())), "by hand")

    # --- invariants --------------------------------------------------------------------

    @invariant()
    def transitions_are_legal_and_end_in_the_row_state(self) -> None:
        with self.db.read() as conn:
            states = dict(
                conn.execute(select(workflow_steps.c.step_uuid, workflow_steps.c.state)).all()
            )
            rows = conn.execute(
                select(workflow_step_transitions).order_by(workflow_step_transitions.c.id)
            ).all()
        history: dict[str, list[Any]] = defaultdict(list)
        for row in rows:
            history[row.step_uuid].append(row)
        assert set(history) == set(states)
        for step_uuid, moves in history.items():
            assert moves[0].from_state is None, moves[0]
            previous: str | None = None
            for move in moves:
                assert move.from_state == previous, (step_uuid, move)
                assert is_legal_step_transition(move.from_state, move.to_state), move
                previous = move.to_state
            assert states[step_uuid] == previous, (step_uuid, states[step_uuid], moves[-1])

    @invariant()
    def no_step_runs_ahead_of_its_parents(self) -> None:
        parent = workflow_steps.alias("parent")
        child = workflow_steps.alias("child")
        with self.db.read() as conn:
            rows = conn.execute(
                select(child.c.step_uuid, child.c.state, parent.c.state)
                .join(workflow_step_edges, workflow_step_edges.c.to_step_uuid == child.c.step_uuid)
                .join(parent, parent.c.step_uuid == workflow_step_edges.c.from_step_uuid)
            ).all()
        for step_uuid, child_state, parent_state in rows:
            if child_state in (PENDING, RESOLVED_MANUALLY, CANCELLED):
                continue  # not started, or settled by an operator
            assert parent_state in DONE, (step_uuid, child_state, parent_state)

    @invariant()
    def a_running_step_carries_its_claim(self) -> None:
        ws, t = workflow_steps, workflow_step_transitions
        with self.db.read() as conn:
            running = conn.execute(select(ws).where(ws.c.state == "in_progress")).all()
            last = {row.step_uuid: row for row in conn.execute(select(t).order_by(t.c.id)).all()}
        for step in running:
            claim = last[step.step_uuid]
            assert (claim.reason, claim.worker_id, claim.attempt) == (
                "claimed",
                step.claimed_by,
                step.attempts,
            ), (step, claim)
            assert step.claimed_by in WORKERS

    @invariant()
    def task_states_follow_their_steps(self) -> None:
        with self.db.read() as conn:
            current = dict(conn.execute(select(tasks.c.task_uuid, tasks.c.state)).all())
            counts: dict[str, Counter[str]] = defaultdict(Counter)
            for task_uuid, state, n in conn.execute(
                select(workflow_steps.c.task_uuid, workflow_steps.c.state, func.count()).group_by(
                    workflow_steps.c.task_uuid, workflow_steps.c.state
                )
            ):
                counts[task_uuid][state] = n
        for task_uuid, state in current.items():
            assert derive_task_state(state, counts[task_uuid]) == state, (
                task_uuid,
                state,
                dict(counts[task_uuid]),
            )

    # --- helpers -----------------------------------------------------------------------

    def _create(self, template: TaskTemplate) -> str:
        with self.db.write() as conn:
            task_uuid = create_task(conn, template, {}, now=self.now)
            self.step_uuids.extend(
                conn.execute(
                    select(workflow_steps.c.step_uuid)
                    .where(workflow_steps.c.task_uuid == task_uuid)
                    .order_by(workflow_steps.c.position)
                ).scalars()
            )
        return task_uuid

    def _step_uuids(self) -> list[str]:
        return self.step_uuids

    def _live_claims(self) -> list[ClaimedStep]:
        ws = workflow_steps
        with self.db.read() as conn:
            held = set(
                conn.execute(
                    select(ws.c.step_uuid, ws.c.attempts, ws.c.claimed_by).where(
                        ws.c.state == "in_progress"
                    )
                ).all()
            )
        return [c for c in self.claims if (c.step_uuid, c.attempt, c.claimed_by) in held]

    def _snapshot(self) -> tuple[Any, ...]:
        with self.db.read() as conn:
            return tuple(
                sorted((tuple(row) for row in conn.execute(select(table))), key=repr)
                for table in (tasks, workflow_steps, workflow_step_transitions)
            )

    def _operate(self, operation: Any, target: str, reason: str | None) -> None:
        before = self._snapshot()
        refusal: TransitionError | None = None
        try:
            with self.db.write() as conn:
                operation(conn, target, operator=OPERATOR, now=self.now, reason=reason)
        except TransitionError as exc:
            refusal = exc
        if refusal is not None:
            assert "\n" not in str(refusal)
            assert self._snapshot() == before, "a refused command wrote something"


StepStateMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStepStateMachine = StepStateMachine.TestCase
