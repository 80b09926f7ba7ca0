"""Priority with aging, checked on real SQL (SQLite) with a controlled clock.

- Claims follow the claim order: every claim takes only steps due by its ``now`` (never one
  early), as many as it may, and none it takes comes after a due step it leaves (by
  ``ready_at - priority * aging``, ties to the higher priority, then to a retry); due retries
  are placed by the same rule.
- The aging bound: a step of priority p waits at most (q - p) * aging behind a steady stream
  of steps of priority q arriving after it (plus one claim interval), however long the stream.
- Eager claims (a commit claiming the dependents it made ready) respect priority too.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select, update

from duplex.clock import utcnow
from duplex.commit.retry import RetryPolicy
from duplex.messages import StepOutcome
from duplex.storage.claim_order import due_steps
from duplex.storage.claims import claim_dependents, claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.models import (
    tasks,
    workflow_step_edges,
    workflow_step_transitions,
    workflow_steps,
)
from duplex.storage.results import commit_outcomes
from duplex.storage.submission import create_task
from duplex.templates import TaskTemplate, parse_template
from tests.conftest import sqlite_database

ONE = {
    ns: parse_template(
        f'name = "one"\nnamespace = "{ns}"\n[[steps]]\nname = "a"\nhandler = "t.a"\n'
    )
    for ns in ("default", "other")
}
T0 = utcnow().replace(microsecond=0)


@pytest.fixture(scope="module")
def sql(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    db = sqlite_database(tmp_path_factory.mktemp("priority") / "p.db")
    yield db
    db.dispose()


def clear(db: Database) -> None:
    with db.write() as conn:
        for table in (workflow_step_transitions, workflow_step_edges, workflow_steps, tasks):
            conn.execute(delete(table))


def add(db: Database, template: TaskTemplate, ready_ms: int, priority: int, retry: bool) -> str:
    with db.write() as conn:
        task = create_task(
            conn,
            template,
            {},
            now=T0,
            run_at=T0 + timedelta(milliseconds=ready_ms),
            priority=priority,
        )
        if retry:  # a failed attempt waiting for its retry, due at the same time
            conn.execute(
                update(workflow_steps)
                .where(workflow_steps.c.task_uuid == task)
                .values(state="waiting_for_retry", attempts=1)
            )
    return task


def order(
    ready: datetime, priority: int, retry: bool, aging: timedelta
) -> tuple[datetime, int, bool]:
    return (ready - priority * aging, -priority, not retry)


step_specs = st.lists(
    st.tuples(
        st.integers(0, 3000),  # ready after (ms)
        st.integers(-100, 100) | st.integers(-3, 3),  # priority
        st.booleans(),  # a due retry rather than a first attempt
        st.sampled_from(["default", "default", "other"]),  # namespace
    ),
    min_size=1,
    max_size=25,
)
claim_specs = st.lists(st.tuples(st.integers(0, 1500), st.integers(1, 6)), min_size=1, max_size=12)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=step_specs, claims=claim_specs, aging_ms=st.integers(1, 2000))
def test_claims_follow_the_aged_priority_order_and_never_take_a_step_early(
    sql: Database,
    steps: list[tuple[int, int, bool, str]],
    claims: list[tuple[int, int]],
    aging_ms: int,
) -> None:
    clear(sql)
    aging = timedelta(milliseconds=aging_ms)
    model: dict[str, tuple[datetime, int, bool, str]] = {}
    for ready_ms, priority, retry, namespace in steps:
        task = add(sql, ONE[namespace], ready_ms, priority, retry)
        model[task] = (T0 + timedelta(milliseconds=ready_ms), priority, retry, namespace)
    now = T0
    taken: set[str] = set()
    for advance_ms, limit in claims:
        now += timedelta(milliseconds=advance_ms)
        with sql.write() as conn:
            got = claim_ready_steps(
                conn, worker_id="w", namespaces=("default",), limit=limit, now=now, aging=aging
            )
        claimed = [step.task_uuid for step in got]
        due = {
            task: order(ready, p, retry, aging)
            for task, (ready, p, retry, namespace) in model.items()
            if namespace == "default" and ready <= now and task not in taken
        }
        assert set(claimed) <= set(due), "a step claimed before its time, or of another namespace"
        assert len(claimed) == min(limit, len(due))
        keys = [due[task] for task in claimed]
        assert keys == sorted(keys), "claims handed on out of order"
        left = [key for task, key in due.items() if task not in claimed]
        if keys and left:
            assert max(keys) <= min(left), "a due step of an earlier claim order was left"
        taken.update(claimed)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        # Most of them due, in two priority levels of two states: full levels, few of them.
        st.tuples(st.integers(0, 1000), st.sampled_from([0, 0, 1]), st.booleans()),
        min_size=1,
        max_size=30,
    ),
    limit=st.integers(1, 9),
    now_ms=st.integers(500, 3000),
    aging_ms=st.integers(1, 2000),
)
def test_one_read_of_the_due_steps_finds_the_first_limit_of_them_in_claim_order(
    sql: Database,
    steps: list[tuple[int, int, bool]],
    limit: int,
    now_ms: int,
    aging_ms: int,
) -> None:
    """What one claim round reads (``due_steps``), with few priority levels and many steps in
    each: its cut, from a level's step at ``limit`` or further on, never stops the read short
    (a claim's later rounds would make up for a short one, at a statement each)."""
    clear(sql)
    aging, now = timedelta(milliseconds=aging_ms), T0 + timedelta(milliseconds=now_ms)
    due = {}
    for ready_ms, priority, retry in steps:
        task = add(sql, ONE["default"], ready_ms, priority, retry)
        ready = T0 + timedelta(milliseconds=ready_ms)
        if ready <= now:
            due[task] = order(ready, priority, retry, aging)
    with sql.read() as conn:
        rows = conn.execute(select(workflow_steps.c.step_uuid, workflow_steps.c.task_uuid)).all()
        task_of = {step: task for step, task in rows}
        read = due_steps(conn, ("default",), limit=limit, now=now, aging=aging)
    found = [task_of[step] for step in read.states]
    assert set(found) <= set(due), "a step read before its time"
    assert len(found) == min(limit, len(due))
    keys = [due[task] for task in found]
    assert keys == sorted(keys), "read out of claim order"
    left = [key for task, key in due.items() if task not in found]
    if keys and left:
        assert max(keys) <= min(left), "a due step of an earlier claim order was left"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    low=st.integers(-100, 50),
    gap=st.integers(1, 150),
    aging_ms=st.integers(1, 40),
    every_ms=st.integers(1, 200),
)
def test_a_low_priority_step_waits_at_most_the_aging_bound_behind_a_steady_stream(
    sql: Database, low: int, gap: int, aging_ms: int, every_ms: int
) -> None:
    """One step of priority ``low`` ready at T0; from T0 on, one step of priority ``high``
    arrives every ``every_ms`` and one step is claimed every ``every_ms``, so the stream alone
    would fill every claim forever. The low step is claimed within the bound."""
    high = min(low + gap, 100)
    bound = (high - low) * timedelta(milliseconds=aging_ms)
    arrivals = bound // timedelta(milliseconds=every_ms) + 3
    if arrivals > 400:
        arrivals = 400
        every_ms = bound // timedelta(milliseconds=397) + 1  # keep the stream past the bound
    clear(sql)
    lone = add(sql, ONE["default"], 0, low, False)
    for k in range(arrivals):
        add(sql, ONE["default"], k * every_ms, high, False)
    interval = timedelta(milliseconds=every_ms)
    for k in range(arrivals):
        now = T0 + k * interval
        with sql.write() as conn:
            (step,) = claim_ready_steps(
                conn,
                worker_id="w",
                namespaces=("default",),
                limit=1,
                now=now,
                aging=timedelta(milliseconds=aging_ms),
            )
        if step.task_uuid == lone:
            assert now - T0 <= bound + interval
            return
    pytest.fail(f"priority {low} still waiting after {arrivals * interval} (bound {bound})")


CHAIN = parse_template(
    'name = "chain"\n[[steps]]\nname = "a"\nhandler = "t.a"\n'
    '[[steps]]\nname = "b"\nhandler = "t.b"\ndepends_on = ["a"]\npriority = 2\n'
    '[[steps]]\nname = "c"\nhandler = "t.c"\ndepends_on = ["a"]\npriority = 7\n'
)


@pytest.mark.parametrize(("queued", "expected"), [(None, ["c"]), (7, ["c"]), (9, [])])
def test_a_commit_claims_dependents_in_priority_order_and_never_ahead_of_higher_work(
    sql: Database, queued: int | None, expected: list[str]
) -> None:
    """Only dependents of the highest priority with due work are claimed (here ``c``, 7);
    ``b`` (2) waits in the queue behind its sibling, and both behind a due step of 9."""
    clear(sql)
    with sql.write() as conn:
        create_task(conn, CHAIN, {}, now=T0)
    with sql.write() as conn:
        (root,) = claim_ready_steps(conn, worker_id="w", namespaces=("default",), limit=1, now=T0)
    if queued is not None:  # a due step of another task, of this priority
        with sql.write() as conn:
            create_task(conn, ONE["default"], {}, now=T0, priority=queued)
    later = T0 + timedelta(seconds=1)
    with sql.write() as conn:
        report = commit_outcomes(
            conn,
            [StepOutcome(root, later, later, result={})],
            policy=RetryPolicy(base_ms=10, multiplier=2.0, max_ms=10, jitter=0.0),
            now=later,
            rng=random.Random(0),
        )
        claimed = claim_dependents(
            conn, report.ready, worker_id="w", namespaces=("default",), limit=2, now=later
        )
    assert [step.name for step in claimed] == expected


@pytest.mark.parametrize(
    ("waited_s", "expected"),
    [
        (3, ["c"]),  # c (7) ready now goes before a 0 that waited 3 s: 7 s of aging > 3 s
        (20, []),  # a 0 that waited 20 s has aged past c (7 s) and b (2 s): both queue
    ],
)
def test_a_commit_claims_no_dependent_ahead_of_lower_work_that_aged_past_it(
    sql: Database, waited_s: int, expected: list[str]
) -> None:
    """The aging bound holds for claims made in a commit too: a stream of high-priority
    chains cannot keep low-priority work waiting past (q - p) * aging."""
    clear(sql)
    later = T0 + timedelta(seconds=30)
    with sql.write() as conn:
        create_task(conn, ONE["default"], {}, now=later - timedelta(seconds=waited_s))
        create_task(conn, CHAIN, {}, now=later - timedelta(seconds=40))
    with sql.write() as conn:
        (root,) = claim_ready_steps(
            conn, worker_id="w", namespaces=("default",), limit=1, now=later - timedelta(seconds=40)
        )
    assert root.name == "a"
    with sql.write() as conn:
        report = commit_outcomes(
            conn,
            [StepOutcome(root, later, later, result={})],
            policy=RetryPolicy(base_ms=10, multiplier=2.0, max_ms=10, jitter=0.0),
            now=later,
            rng=random.Random(0),
        )
        claimed = claim_dependents(
            conn,
            report.ready,
            worker_id="w",
            namespaces=("default",),
            limit=2,
            now=later,
            aging=timedelta(seconds=1),
        )
    assert [step.name for step in claimed] == expected
