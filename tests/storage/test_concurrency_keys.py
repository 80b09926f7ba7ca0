"""Concurrency keys in storage, on SQLite and PostgreSQL: the claim admits a key's steps up to
its limit and holds back the rest; a commit ending a keyed attempt lets one go in the same
transaction; the sweep lets go whatever a key has room for; submission refuses a context
without the key's value, writing nothing.

On PostgreSQL, claims racing on separate connections (hypothesis draws the workload) never
admit more of a key than its limit.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text

from duplex.clock import utcnow
from duplex.commit.retry import RetryPolicy
from duplex.dynamic.directives import Batch, Directive, read_return_value
from duplex.errors import InputError, TemplateError
from duplex.messages import ClaimedStep, StepFailure, StepOutcome
from duplex.states import is_legal_step_transition
from duplex.storage import claims as claims_module
from duplex.storage import concurrency
from duplex.storage.claims import claim_ready_steps
from duplex.storage.concurrency import KeyLoad, keys_with_room, running_per_key, sweep_held
from duplex.storage.db import Database
from duplex.storage.models import tasks, workflow_step_transitions, workflow_steps
from duplex.storage.queries import task_steps
from duplex.storage.results import commit_outcomes
from duplex.storage.submission import create_task, create_tasks
from duplex.templates import parse_template
from tests.storage.support import Flow, claim, commit_and_claim, ok

ws = workflow_steps


def keyed(limit: int, key: str = "context.customer", name: str = "sync") -> Any:
    return parse_template(
        f'name = "{name}"\n[[steps]]\nname = "s"\nhandler = "t.s"\n'
        f'concurrency = {{ key = "{key}", limit = {limit} }}\n'
    )


PLAIN = parse_template('name = "plain"\n[[steps]]\nname = "p"\nhandler = "t.p"\n')


def submit(db: Database, template: Any, customers: list[str], now: datetime) -> list[str]:
    with db.write() as conn:
        return create_tasks(conn, template, [{"customer": c} for c in customers], now=now)


def finish(db: Database, steps: list[ClaimedStep], now: datetime) -> Any:
    with db.write() as conn:
        return commit_outcomes(
            conn,
            [StepOutcome(step, now, now, result={}) for step in steps],
            policy=RetryPolicy(),
            now=now,
            rng=random.Random(0),
        )


def states(db: Database) -> Counter[tuple[str | None, str]]:
    with db.read() as conn:
        rows = conn.execute(select(ws.c.concurrency_key, ws.c.state)).all()
    return Counter((key, state) for key, state in rows)


def customers_of(steps: list[ClaimedStep]) -> Counter[str | None]:
    return Counter(step.concurrency_key for step in steps)


def test_a_claim_admits_each_key_up_to_its_limit_and_holds_the_rest(db: Database) -> None:
    t0 = utcnow()
    submit(db, keyed(2), ["a"] * 6, t0)
    submit(db, keyed(2), ["b"] * 2, t0 + timedelta(milliseconds=1))
    with db.write() as conn:
        create_task(conn, PLAIN, {}, now=t0 + timedelta(milliseconds=2))
    later = t0 + timedelta(seconds=1)
    claimed = claim(db, later, limit=10)
    # Key a's backlog, first in the queue, does not keep the claim from b and the plain step.
    assert customers_of(claimed) == {"context.customer=a": 2, "context.customer=b": 2, None: 1}
    assert states(db)[("context.customer=a", "waiting")] == 4
    # Held steps are no attempt: their count is untouched, and the transition says why.
    with db.read() as conn:
        held = conn.execute(
            select(ws.c.attempts, workflow_step_transitions.c.reason)
            .join(
                workflow_step_transitions, workflow_step_transitions.c.step_uuid == ws.c.step_uuid
            )
            .where(ws.c.state == "waiting", workflow_step_transitions.c.to_state == "waiting")
        ).all()
        assert running_per_key(conn) == [
            KeyLoad("context.customer=a", 2, 4, 2),
            KeyLoad("context.customer=b", 2, 0, 2),
        ]
    assert len(held) == 4
    assert all(attempts == 0 for attempts, _ in held)
    assert all(
        r == "held by concurrency key context.customer=a: 2 running, limit 2" for _, r in held
    )
    assert claim(db, later) == []


def test_a_claim_reads_flow_control_only_when_a_candidate_has_a_key(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    admitted: list[int] = []
    real_admit = concurrency.admit

    def counted(conn: Any, candidates: Any, **kw: Any) -> Any:
        admitted.append(len(candidates))
        return real_admit(conn, candidates, **kw)

    monkeypatch.setattr(claims_module, "admit", counted)
    t0 = utcnow()
    with db.write() as conn:
        for i in range(3):
            create_task(conn, PLAIN, {}, now=t0 + timedelta(milliseconds=i))
    later = t0 + timedelta(seconds=1)
    assert len(claim(db, later, limit=2)) == 2
    assert admitted == []  # nothing to count: the claim took the first two as they came
    submit(db, keyed(1), ["a", "a"], t0 + timedelta(milliseconds=5))
    claimed = claim(db, later, limit=10)
    # The plain step left and one of key a; the other is held by its key.
    assert customers_of(claimed) == {None: 1, "context.customer=a": 1}
    assert admitted == [3]
    assert states(db)[("context.customer=a", "waiting")] == 1


def test_a_commit_lets_one_held_step_go_per_ended_attempt(db: Database) -> None:
    t0 = utcnow()
    submit(db, keyed(1), ["a"] * 3, t0)
    now = t0 + timedelta(seconds=1)
    (first,) = claim(db, now)
    assert states(db)[("context.customer=a", "waiting")] == 2
    report = finish(db, [first], now)
    # In the same transaction: one held step is ready again (and said so to the committer).
    assert len(report.ready) == 1
    assert states(db)[("context.customer=a", "enqueued")] == 1
    assert states(db)[("context.customer=a", "waiting")] == 1
    (second,) = claim(db, now + timedelta(seconds=1))
    finish(db, [second], now + timedelta(seconds=1))
    (third,) = claim(db, now + timedelta(seconds=2))
    finish(db, [third], now + timedelta(seconds=2))
    assert states(db) == {("context.customer=a", "complete"): 3}


def test_the_sweep_lets_go_what_a_key_has_room_for(db: Database) -> None:
    t0 = utcnow()
    submit(db, keyed(2), ["a"] * 5, t0)
    now = t0 + timedelta(seconds=1)
    running = claim(db, now)
    assert len(running) == 2
    # A key with both slots taken has no room: nothing to let go.
    with db.read() as conn:
        assert keys_with_room(conn, now=now) == []
    # The running attempts vanish without a commit that lets go (an operator's manual fix):
    # the sweep finds the room and fills it, no more.
    with db.write() as conn:
        conn.execute(ws.update().where(ws.c.state == "in_progress").values(state="error"))
    with db.read() as conn:
        keys = keys_with_room(conn, now=now)
    assert keys == ["context.customer=a"]
    with db.write() as conn:
        let = sweep_held(conn, keys, now=now, worker_id="w1")
    assert len(let) == 2
    assert states(db)[("context.customer=a", "enqueued")] == 2
    assert states(db)[("context.customer=a", "waiting")] == 1


def test_keys_in_inputs_and_numbers(db: Database) -> None:
    template = parse_template(
        'name = "by_api"\n[[steps]]\nname = "s"\nhandler = "t.s"\n'
        'inputs = { api = { id = 7 } }\nconcurrency = { key = "inputs.api.id", limit = 1 }\n'
    )
    with db.write() as conn:
        create_tasks(conn, template, [{}, {}], now=utcnow())
    assert states(db)[("inputs.api.id=7", "enqueued")] == 2


def test_a_context_without_the_key_is_refused_and_nothing_is_written(db: Database) -> None:
    missing = r"step 's'.*context.customer: the task's context has no"
    with pytest.raises(InputError, match=missing), db.write() as conn:
        create_tasks(conn, keyed(1), [{"customer": "a"}, {"other": 1}], now=utcnow())
    not_scalar = "the value is dict, not a string, number or boolean"
    with pytest.raises(InputError, match=not_scalar), db.write() as conn:
        create_task(conn, keyed(1), {"customer": {"id": 1}}, now=utcnow())
    with db.read() as conn:
        assert conn.execute(select(func.count()).select_from(tasks)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(ws)).scalar_one() == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('concurrency = { key = "customer", limit = 1 }', "String should match pattern"),
        ('concurrency = { key = "context.c", limit = 0 }', "greater than or equal to 1"),
        ('concurrency = { key = "context.c" }', "limit"),
        ('concurrency = { key = "inputs.missing", limit = 1 }', "the step's inputs has no"),
        ('concurrency = { key = "inputs.item.id", limit = 1 }', "reads a batch item"),
    ],
)
def test_bad_declarations_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        parse_template(f'name = "x"\n[[steps]]\nname = "s"\nhandler = "t.s"\n{text}\n')


def test_a_wait_step_takes_no_key() -> None:
    with pytest.raises(TemplateError, match="a wait step runs no handler; `concurrency`"):
        parse_template(
            'name = "x"\n[[steps]]\nname = "w"\nkind = "wait"\nsignal = "go"\n'
            'concurrency = { key = "context.c", limit = 1 }\n'
        )


# --- PostgreSQL: racing claims ------------------------------------------------------------------


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    limits=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    steps=st.lists(st.integers(0, 3), min_size=4, max_size=30),
    claimers=st.integers(2, 4),
    batch=st.integers(1, 4),
)
def test_racing_claims_never_admit_a_key_over_its_limit(
    postgres_db: Database, limits: list[int], steps: list[int], claimers: int, batch: int
) -> None:
    """Claimers on their own connections, released together by a barrier, claim in rounds
    until every step ran; between rounds half of the running attempts end (their commits let
    held steps go). After every round the running attempts of each key, read in SQL, are
    within its limit, and in the end every step ran once."""
    db = postgres_db
    run_id = uuid.uuid4().hex[:8]  # examples share the schema: keys of their own
    now = utcnow()
    by_key = Counter(i % len(limits) for i in steps)
    for i, count in by_key.items():
        submit(db, keyed(limits[i], name=f"k{i}"), [f"{run_id}-{i}"] * count, now)
    limit_of = {f"context.customer={run_id}-{i}": limit for i, limit in enumerate(limits)}
    for _ in range(200):
        barrier = threading.Barrier(claimers)
        errors: list[BaseException] = []

        def run(i: int, barrier: Any = barrier, errors: list[BaseException] = errors) -> None:
            try:
                barrier.wait(timeout=10)
                claim(db, utcnow(), limit=batch, worker=f"w{i}")
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(claimers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors, errors
        running = _running_steps(db)
        for key, count in customers_of(running).items():
            assert key is not None
            assert count <= limit_of[key], (key, count)
        if not running:
            break
        finish_all(db, running[::2] if len(running) > 1 else running)
    final = states(db)
    for i, count in by_key.items():
        key = f"context.customer={run_id}-{i}"
        assert {state: n for (k, state), n in final.items() if k == key} == {"complete": count}


def _running_steps(db: Database) -> list[ClaimedStep]:
    from duplex.storage.claims import STEP_COLUMNS, claimed_step

    with db.read() as conn:
        rows = conn.execute(
            select(*STEP_COLUMNS, ws.c.claimed_by).where(ws.c.state == "in_progress")
        ).all()
    return [claimed_step(row, claimed_by=row.claimed_by) for row in rows]


def finish_all(db: Database, steps: list[ClaimedStep]) -> None:
    if steps:
        report = finish(db, steps, utcnow())
        assert len(report.applied) == len(steps)


# --- what the review of this code found ----------------------------------------------------------


BATCH_BY_API = """
name = "ops"
[[steps]]
name = "split"
kind = "batch"
handler = "t.split"
worker = "call"
[[steps]]
name = "call"
handler = "t.call"
depends_on = ["split"]
inputs = { api = "crm" }
concurrency = { key = "inputs.api", limit = 1 }
"""


def test_batch_items_take_their_key_from_the_item_steps_inputs(db: Database) -> None:
    """A key in the item step's own inputs (not the item) is read from them at expansion."""
    flow = Flow(db, BATCH_BY_API)
    (split,) = flow.claim("split")
    directive = read_return_value(
        Batch([{"n": 1}, {"n": 2}]), split.kind, split.spec, max_batch_items=10
    )
    assert isinstance(directive, Directive), directive
    now = utcnow()
    outcome = StepOutcome(split, now, now, result=directive.result, items=directive.items)
    with db.write() as conn:
        commit_outcomes(conn, [outcome], policy=RetryPolicy(), now=now, rng=random.Random(0))
    assert states(db)[("inputs.api=crm", "enqueued")] == 2
    with db.write() as conn:
        calls = claim_ready_steps(
            conn, worker_id="w1", namespaces=[flow.namespace], limit=10, now=utcnow()
        )
    assert len(calls) == 1  # one at a time: the other is held
    # An item without the value its key reads is the batch's invalid result, before any SQL.
    by_item = {
        "worker": {
            "name": "call",
            "inputs": {},
            "concurrency": {"key": "inputs.item.id", "limit": 1},
        }
    }
    refused = read_return_value(Batch([{"id": 1}, {}]), "batch", by_item, max_batch_items=10)
    assert isinstance(refused, StepFailure)
    assert "batch item 1: concurrency key inputs.item.id" in refused.message


def test_letting_go_never_waits_for_a_row_another_transaction_holds(
    postgres_db: Database,
) -> None:
    """A held step locked by another transaction (``duplex cancel`` of its task) is skipped:
    the commit goes on with the next held step instead of waiting (no deadlock cycle)."""
    db = postgres_db
    t0 = utcnow()
    submit(db, keyed(1), ["a"] * 3, t0)
    (running,) = claim(db, t0 + timedelta(seconds=1))
    with db.read() as conn:
        held = list(
            conn.execute(
                select(ws.c.step_uuid).where(ws.c.state == "waiting").order_by(ws.c.created_at)
            ).scalars()
        )
    blocker = db.engine.connect()
    try:
        transaction = blocker.begin()
        blocker.execute(select(ws.c.step_uuid).where(ws.c.step_uuid == held[0]).with_for_update())
        with db.write() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '5s'"))
            report = commit_outcomes(
                conn,
                [StepOutcome(running, t0, t0, result={})],
                policy=RetryPolicy(),
                now=t0 + timedelta(seconds=2),
                rng=random.Random(0),
            )
        transaction.rollback()
    finally:
        blocker.close()
    assert [step.step_uuid for step in report.ready] == [held[1]]


def test_the_sweep_does_not_count_steps_not_due_as_taking_a_slot(db: Database) -> None:
    t0 = utcnow()
    with db.write() as conn:
        create_task(conn, keyed(1), {"customer": "a"}, now=t0, run_at=t0 + timedelta(days=7))
    submit(db, keyed(1), ["a"] * 2, t0)
    now = t0 + timedelta(seconds=1)
    assert len(claim(db, now)) == 1
    with db.write() as conn:
        conn.execute(ws.update().where(ws.c.state == "in_progress").values(state="error"))
    # The one due next week does not hold the key's only slot today.
    with db.read() as conn:
        assert keys_with_room(conn, now=now) == ["context.customer=a"]


def test_every_transition_holding_and_letting_go_write_is_legal(db: Database) -> None:
    t0 = utcnow()
    submit(db, keyed(1), ["a"] * 3, t0)
    for i in range(3):
        now = t0 + timedelta(seconds=1 + i)
        finish(db, claim(db, now), now)
    t = workflow_step_transitions
    with db.read() as conn:
        moves = conn.execute(select(t.c.from_state, t.c.to_state)).all()
    assert ("enqueued", "waiting") in moves
    assert ("waiting", "enqueued") in moves
    assert all(f is None or is_legal_step_transition(f, to) for f, to in moves), moves


def test_duplex_status_of_a_task_says_which_key_holds_its_step(db: Database) -> None:
    t0 = utcnow()
    submit(db, keyed(1), ["a"], t0)
    (held_task,) = submit(db, keyed(1), ["a"], t0 + timedelta(milliseconds=1))
    claim(db, t0 + timedelta(seconds=1))
    with db.read() as conn:
        (step,) = task_steps(conn, held_task)
    assert (step.state, step.note) == (
        "waiting",
        "held by concurrency key context.customer=a: 1 running, limit 1",
    )


KEYED_SECOND = parse_template(
    'name = "then_sync"\n[[steps]]\nname = "prep"\nhandler = "t.p"\n'
    '[[steps]]\nname = "sync"\nhandler = "t.s"\ndepends_on = ["prep"]\n'
    'concurrency = { key = "context.customer", limit = 1 }\n'
)


def test_a_commit_claiming_keyed_dependents_holds_them_to_the_limit(db: Database) -> None:
    """Dependents a result's commit claims for itself (eager dispatch) obey their key too."""
    t0 = utcnow()
    submit(db, KEYED_SECOND, ["a", "a"], t0)
    now = t0 + timedelta(seconds=1)
    preps = claim(db, now)
    assert sorted(step.name for step in preps) == ["prep", "prep"]
    _, claimed = commit_and_claim(db, [ok(step, now, {}) for step in preps], now, limit=2)
    assert [step.name for step in claimed] == ["sync"]
    assert states(db)[("context.customer=a", "waiting")] == 1


def test_the_readiness_update_says_which_dependents_have_a_key_or_a_limit(db: Database) -> None:
    """A commit reads flow control only for dependents that have some: a plain dependent
    must come back not limited (SQLite 3.40 once said it was, costing every hop a read)."""
    plain = parse_template(
        'name = "plain"\n[[steps]]\nname = "prep"\nhandler = "t.p"\n'
        '[[steps]]\nname = "sync"\nhandler = "t.s"\ndepends_on = ["prep"]\n'
    )
    t0 = utcnow()
    submit(db, KEYED_SECOND, ["a"], t0)
    submit(db, plain, ["a"], t0)
    now = t0 + timedelta(seconds=1)
    preps = claim(db, now)
    report = finish(db, preps, now)
    with db.read() as conn:
        templates = dict(
            conn.execute(
                select(workflow_steps.c.step_uuid, tasks.c.name).join(
                    tasks, tasks.c.task_uuid == workflow_steps.c.task_uuid
                )
            ).all()
        )
    limited = {templates[step.step_uuid]: step.limited for step in report.ready}
    assert limited == {"then_sync": True, "plain": False}
