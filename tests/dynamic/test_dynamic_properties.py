"""Random workflows with decisions and batches, driven through claims and commits (hypothesis).

Each example draws a template of plain, decision and batch steps wired at random (a step may
depend on any earlier step, branches and item steps included, so convergences of branches
and of batches appear), every decision's choice (no branch allowed), every batch's item count
(0 allowed), a retryable failure for some attempts, and how the work is interleaved: several
workers claim from the same queue, hold their claims, and commit in a random order, several
outcomes per transaction.

A reference model gives what must run: a step runs unless a decision did not choose it or
every parent it has was skipped; a batch's items run once each. The run must match it
exactly, each step and item succeeding exactly once, every step claimed only after each of
its parents (items included) was done, and no step both skipped and run.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from duplex.clock import utcnow
from duplex.dynamic.directives import Batch, Decision, Directive, read_return_value
from duplex.messages import ClaimedStep, StepFailure, StepOutcome
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.models import workflow_step_transitions, workflow_steps
from duplex.storage.results import commit_outcomes
from duplex.storage.submission import create_task
from duplex.templates import TaskTemplate
from tests.conftest import sqlite_database
from tests.storage.support import POLICY

ws, wst = workflow_steps, workflow_step_transitions


@dataclass(frozen=True)
class Shape:
    """A drawn template: per step its kind and parents (by index), decisions' branches."""

    kinds: tuple[str, ...]  # "handler", "decision", "batch", "item" (a batch's worker)
    parents: tuple[tuple[int, ...], ...]
    branches: tuple[tuple[int, ...], ...]  # per decision step: its branch steps

    def name(self, i: int) -> str:
        return f"s{i:02d}"

    def as_parent(self, i: int) -> int:
        """Until its items exist, depending on an item step is depending on its batch."""
        return i - 1 if self.kinds[i] == "item" else i

    def template(self) -> TaskTemplate:
        steps: list[dict[str, Any]] = []
        for i, kind in enumerate(self.kinds):
            step: dict[str, Any] = {
                "name": self.name(i),
                "handler": "t.h",
                "depends_on": [self.name(p) for p in self.parents[i]],
                "max_attempts": 3,
            }
            if kind == "decision":
                step["kind"] = "decision"
                step["branches"] = [self.name(b) for b in self.branches[i]]
            if kind == "batch":
                step["kind"] = "batch"
                step["worker"] = self.name(i + 1)
            steps.append(step)
        return TaskTemplate.model_validate({"name": "dyn", "steps": steps})


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    kinds: list[str] = []
    parents: list[tuple[int, ...]] = []
    branches: dict[int, list[int]] = {}
    branch_taken: set[int] = set()
    size = draw(st.integers(3, 14))
    while len(kinds) < size:
        i = len(kinds)
        kind = draw(st.sampled_from(["handler", "handler", "decision", "batch"]))
        # Any earlier step may be a parent: a branch (a convergence of a decision), an item
        # step (a batch's convergence), a batch or decision step itself.
        chosen = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        kinds.append(kind)
        parents.append(tuple(sorted(chosen)))
        if kind == "batch":
            kinds.append("item")
            parents.append((i,))
        if kind == "decision":
            for _ in range(draw(st.integers(1, 3))):
                b = len(kinds)
                extra = draw(st.sets(st.integers(0, i - 1), max_size=1)) if i else set()
                kinds.append("handler")
                parents.append(tuple(sorted({i, *extra})))
                branches.setdefault(i, []).append(b)
                branch_taken.add(b)
    return Shape(
        tuple(kinds),
        tuple(parents),
        tuple(tuple(branches.get(i, ())) for i in range(len(kinds))),
    )


@dataclass(frozen=True)
class Run:
    choices: dict[str, tuple[str, ...]]
    counts: dict[str, int]
    expected: set[str]  # every step name that must succeed, items included
    skipped: set[str]


def reference(shape: Shape, rng: random.Random) -> Run:
    """What must run, for choices and counts drawn from ``rng``."""
    choices: dict[str, tuple[str, ...]] = {}
    counts: dict[str, int] = {}
    state: dict[int, str] = {}
    for i, kind in enumerate(shape.kinds):
        name = shape.name(i)
        if kind == "item":
            continue
        # Not chosen by a decision that ran (a branch of a skipped decision is like any
        # other step: skipped only if every parent is).
        decided_out = any(
            i in shape.branches[d] and shape.name(i) not in choices[shape.name(d)]
            for d in range(i)
            if shape.name(d) in choices
        )
        ps = [shape.as_parent(p) for p in shape.parents[i]]
        if decided_out or (ps and all(state[p] == "skipped" for p in ps)):
            state[i] = "skipped"
            continue
        state[i] = "ran"
        if kind == "decision":
            options = [shape.name(b) for b in shape.branches[i]]
            choices[name] = tuple(o for o in options if rng.random() < 0.5)
        if kind == "batch":
            counts[name] = rng.choice([0, 0, 1, 2, 3, 5])
    expected = {shape.name(i) for i, s in state.items() if s == "ran"}
    for batch, count in counts.items():
        worker = shape.name(int(batch[1:]) + 1)
        expected.update(f"{worker}[{k}]" for k in range(count))
    skipped = {shape.name(i) for i, s in state.items() if s == "skipped"}
    return Run(choices, counts, expected, skipped)


def drive(db: Database, shape: Shape, run: Run, rng: random.Random) -> tuple[str, dict[str, int]]:
    """Run a task with three interleaved workers; return it and how often each step
    succeeded."""
    namespace = f"ns{uuid.uuid4().hex}"
    template = shape.template().model_copy(update={"namespace": namespace})
    with db.write() as conn:
        task = create_task(conn, template, {}, now=utcnow())
    held: list[ClaimedStep] = []
    succeeded: dict[str, int] = {}
    for _ in range(2000):
        if not held or rng.random() < 0.4:
            with db.write() as conn:
                claimed = claim_ready_steps(
                    conn,
                    worker_id=rng.choice(["w1", "w2", "w3"]),
                    namespaces=[namespace],
                    limit=rng.randint(1, 4),
                    now=utcnow(),
                )
            held.extend(claimed)
            if not claimed and not held:
                return task, succeeded
            continue
        rng.shuffle(held)
        cut = rng.randint(1, len(held))
        batch, held = held[:cut], held[cut:]
        outcomes = [outcome(step, run, rng) for step in batch]
        now = utcnow()
        with db.write() as conn:
            report = commit_outcomes(conn, outcomes, policy=POLICY, now=now, rng=random.Random(0))
        assert not report.rejected
        for applied in report.applied:
            if applied.failure is None:
                succeeded[applied.step.name] = succeeded.get(applied.step.name, 0) + 1
    raise AssertionError("the task did not finish in 2000 rounds")


def outcome(step: ClaimedStep, run: Run, rng: random.Random) -> StepOutcome:
    now = utcnow()
    if step.attempt < step.max_attempts and rng.random() < 0.25:
        failure = StepFailure("flaky", "try again", retryable=True)
        return StepOutcome(step, now, now, failure=failure)
    value: Any = {"ran": step.name}
    if step.kind == "decision":
        value = Decision(run.choices[step.name])
    elif step.kind == "batch":
        value = Batch(range(run.counts[step.name]))
    directive = read_return_value(value, step.kind, step.spec, max_batch_items=100)
    assert isinstance(directive, Directive)
    return StepOutcome(
        step, now, now, result=directive.result, branches=directive.branches, items=directive.items
    )


def check_order(db: Database, task: str, shape: Shape) -> None:
    """Every claim of a step came after each of its template's parents was done, and a
    convergence's after every item of its batch (transition ids follow commit order)."""
    with db.read() as conn:
        done_at: dict[str, int] = {}
        claims: dict[str, list[int]] = {}
        for name, to_state, row_id in conn.execute(
            select(ws.c.name, wst.c.to_state, wst.c.id)
            .join(ws, ws.c.step_uuid == wst.c.step_uuid)
            .where(ws.c.task_uuid == task)
            .order_by(wst.c.id)
        ):
            if to_state in ("complete", "skipped"):
                done_at[name] = row_id
            if to_state == "in_progress":
                claims.setdefault(name, []).append(row_id)
    for i, parents in enumerate(shape.parents):
        required = []
        for p in parents:
            if shape.kinds[p] == "item":
                prefix = f"{shape.name(p)}["
                required += [name for name in done_at if name.startswith(prefix)]
                required.append(shape.name(p - 1))  # its batch step
            else:
                required.append(shape.name(p))
        for claim_id in claims.get(shape.name(i), []):
            for parent in required:
                assert parent in done_at, (parent, shape.name(i))
                assert done_at[parent] < claim_id, (parent, shape.name(i))


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    """One database for every example (each its own task and namespace): migrating a new one
    per example cost more than the example."""
    db = sqlite_database(tmp_path_factory.mktemp("dyn") / "dyn.db")
    yield db
    db.dispose()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(shape=shapes(), seed=st.integers(0, 2**32 - 1))
def test_exactly_the_chosen_steps_and_items_run_each_once_after_their_parents(
    shared_db: Database, shape: Shape, seed: int
) -> None:
    db = shared_db
    rng = random.Random(seed)
    run = reference(shape, rng)
    task, succeeded = drive(db, shape, run, rng)

    assert set(succeeded) == run.expected
    assert all(count == 1 for count in succeeded.values()), succeeded
    with db.read() as conn:
        mine = ws.c.task_uuid == task
        states = dict(conn.execute(select(ws.c.name, ws.c.state).where(mine)).all())
        ran_skipped = conn.execute(
            select(ws.c.name)
            .join(wst, wst.c.step_uuid == ws.c.step_uuid)
            .where(mine, ws.c.state == "skipped", wst.c.to_state == "in_progress")
        ).all()
    assert {name for name, state in states.items() if state == "skipped"} == run.skipped
    assert {name for name, state in states.items() if state == "complete"} == run.expected
    assert ran_skipped == []
    check_order(db, task, shape)
