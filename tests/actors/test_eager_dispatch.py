"""Eager dispatch through the real actors on SQLite: a commit that makes dependents ready
claims some for this worker in the same transaction and hands them straight to the Dispatcher.

The moments are made, not waited for: handlers are held in their slots (``Waves``) until the
test has read the worker's state, the poll is too slow to matter (a minute), so the only claims
are the ones the test's nudge and the commits cause, and the stop's stages are run one at a
time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from sqlalchemy import func, select

from duplex.handlers import HandlerRegistry, StepContext
from duplex.messages import Status
from duplex.storage.db import Database
from duplex.storage.models import workflow_step_transitions, workflow_steps
from duplex.subscriptions import SubscriberRegistry
from duplex.worker import flow
from duplex.worker.wiring import Worker
from tests.actors.support import Gauge, Waves, fresh_database, submit
from tests.conftest import make_settings, open_work, wait_until

ASK_S = 10.0
HOLD_S = 60.0


@contextmanager
def quiet_worker(
    db: Database, slots: int, registry: HandlerRegistry, **worker: Any
) -> Iterator[tuple[Worker, dict[str, Any]]]:
    """A worker with ``slots`` slots and no prefetch that claims only when nudged (its poll
    comes once a minute); stopped on exit, its final stats left in the dict."""
    running = Worker(
        make_settings(
            str(db.url),
            worker={"max_concurrent_handlers": slots, "prefetch": 0, **worker},
            event_system={"polling_interval_ms": 60_000},
        ),
        db,
        registry=registry,
        subscribers=SubscriberRegistry(),
    )
    final: dict[str, Any] = {}
    running.start()
    try:
        yield running, final
    finally:
        final.update(running.stop())


def fan_out(children: int) -> list[dict[str, Any]]:
    """root -> ``children`` held steps -> join."""
    names = [f"c{i}" for i in range(children)]
    return [
        {"name": "root", "handler": "eager.quick"},
        *({"name": name, "handler": "eager.held", "depends_on": ["root"]} for name in names),
        {"name": "join", "handler": "eager.quick", "depends_on": names},
    ]


def held_claims(db: Database, worker_id: str) -> int:
    with db.read() as conn:
        query = select(func.count()).where(
            workflow_steps.c.state == "in_progress", workflow_steps.c.claimed_by == worker_id
        )
        return int(conn.execute(query).scalar_one())


def moves(db: Database, name: str) -> list[tuple[Any, ...]]:
    t, ws = workflow_step_transitions, workflow_steps
    with db.read() as conn:
        rows = conn.execute(
            select(t.c.from_state, t.c.to_state, t.c.attempt, t.c.reason)
            .join(ws, ws.c.step_uuid == t.c.step_uuid)
            .where(ws.c.name == name)
            .order_by(t.c.id)
        )
        return [tuple(row) for row in rows]


@pytest.mark.parametrize("slots", [2, 3, 5])
def test_eager_claims_count_against_the_intake_credits(slots: int) -> None:
    """A root completes and makes 3 x slots dependents ready: its commit claims one (the
    root's slot carries on), the intake hears of it and claims only what is left of the
    slots. Wave after wave, the worker holds exactly its slots: no claim waits in the
    Dispatcher. A commit claiming every dependent, or an intake not told of the eager claim,
    holds more.

    With two slots or more the claim that took the root came back short, so the intake
    waits for a signal (the commit's nudge, sent after it told of the eager claim) rather
    than claim on the root's freed credit; with one slot it may claim on that credit before
    it hears of the commit, and hold one step more for a wave, as the bound allows.
    """
    registry = HandlerRegistry()
    gauge, waves = Gauge(), Waves()
    registry.register("eager.quick", lambda ctx: {"step": ctx.step_name})

    done = threading.Event()
    entered: list[str] = []

    def held(ctx: StepContext) -> dict[str, Any]:
        leave = gauge.enter(ctx.cancelled)
        entered.append(ctx.step_name)
        try:
            assert done.is_set() or waves.hold(HOLD_S)
            return {"step": ctx.step_name}
        finally:
            leave()

    registry.register("eager.held", held)
    children = 3 * slots
    with (
        fresh_database() as db,
        quiet_worker(db, slots, registry) as (worker, final),
        ExitStack() as stack,
    ):
        actors = worker.actors
        assert actors is not None
        # The wake-up listener's first look, and the claim it asked for, are over before the
        # task exists: a late one would claim on the root's freed slot before the intake
        # hears of the commit's eager claim, and hold one step more than the slots.
        assert wait_until(lambda: actors.event_system.listener_settled().get(timeout=ASK_S))
        actors.event_system.stats().get(timeout=ASK_S)
        actors.step_executor.claimed_total.get(timeout=ASK_S)
        submit(db, fan_out(children))
        worker.nudge()
        waves_seen: list[tuple[int, int, int]] = []
        stack.callback(waves.release)  # whatever happens, nothing is held at the stop
        stack.callback(done.set)
        for wave in range(3):
            # Every slot holds a dependent of this wave (the first: the eager one and the
            # intake's); the last wave's have left.
            def wave_in(wave: int = wave) -> bool:
                return len(entered) == (wave + 1) * slots and gauge.current == slots

            assert wait_until(wave_in, timeout_s=30), (len(entered), gauge.current)
            # Barriers: a claim on its way has reached the Dispatcher before it is read.
            actors.command_processor.handle(Status()).get(timeout=ASK_S).get(timeout=ASK_S)
            actors.step_executor.claimed_total.get(timeout=ASK_S)
            dispatcher = actors.dispatcher.stats().get(timeout=ASK_S)
            waves_seen.append((dispatcher["running"], dispatcher["waiting"], gauge.current))
            if wave == 0:
                # Nothing has finished yet: the root's result is committed, every dependent
                # claimed is running in a slot, and nothing more is claimed.
                assert held_claims(db, worker.worker_id) == slots
                assert worker.status()["completion"]["claimed_eagerly"] == 1
                assert worker.status()["intake"]["free"] == 0
            waves.release()
        assert wait_until(lambda: open_work(db) == 0, timeout_s=30)
        intake = worker.status()["intake"]
        join = moves(db, "join")
    assert waves_seen == [(slots, 0, slots)] * 3
    assert (intake["free"], intake["excess"]) == (slots, 0)
    # The root carried on with one dependent, the last dependents with the join.
    assert final["completion"]["claimed_eagerly"] == 2
    assert join[-2:] == [
        ("enqueued", "in_progress", 1, "claimed"),
        ("in_progress", "complete", 1, "succeeded"),
    ]


def test_with_eager_dispatch_off_every_step_goes_through_the_queue() -> None:
    registry = HandlerRegistry()
    registry.register("eager.quick", lambda ctx: {"step": ctx.step_name})
    chain = [{"name": "s0", "handler": "eager.quick"}] + [
        {"name": f"s{i}", "handler": "eager.quick", "depends_on": [f"s{i - 1}"]}
        for i in range(1, 5)
    ]
    with fresh_database() as db:
        with quiet_worker(db, 2, registry, eager_dispatch=False) as (worker, final):
            submit(db, chain)
            worker.nudge()
            assert wait_until(lambda: open_work(db) == 0, timeout_s=30)
        with quiet_worker(db, 2, registry) as (worker, eager):
            submit(db, chain, name="again")
            worker.nudge()
            assert wait_until(lambda: open_work(db) == 0, timeout_s=30)
    assert final["completion"]["claimed_eagerly"] == 0
    assert eager["completion"]["claimed_eagerly"] == 4


def one_held_parent(db: Database) -> tuple[HandlerRegistry, threading.Event, threading.Event]:
    """Register ``a`` (held until released) -> ``b``; return the registry, the event set when
    ``a`` runs, and the one that lets it finish."""
    registry = HandlerRegistry()
    started, finish = threading.Event(), threading.Event()
    b_ran: list[str] = []

    def a(ctx: StepContext) -> dict[str, Any]:
        started.set()
        assert finish.wait(HOLD_S)
        return {}

    registry.register("eager.a", a)
    registry.register("eager.b", lambda ctx: b_ran.append(ctx.step_name))
    submit(
        db,
        [
            {"name": "a", "handler": "eager.a"},
            {"name": "b", "handler": "eager.b", "depends_on": ["a"]},
        ],
    )
    return registry, started, finish


def claims_landed(worker: Worker) -> None:
    """Wait until a claim the intake sent before it stopped has been made (or found none)."""
    assert worker.actors is not None
    worker.actors.command_processor.handle(Status()).get(timeout=ASK_S).get(timeout=ASK_S)
    worker.actors.step_executor.claimed_total.get(timeout=ASK_S)


def state_of(db: Database, name: str) -> tuple[str, int]:
    with db.read() as conn:
        row = conn.execute(
            select(workflow_steps.c.state, workflow_steps.c.attempts).where(
                workflow_steps.c.name == name
            )
        ).one()
    return row.state, row.attempts


def test_once_the_intake_stops_commits_claim_nothing() -> None:
    with fresh_database() as db:
        registry, started, finish = one_held_parent(db)
        with quiet_worker(db, 2, registry) as (worker, final):
            assert worker.actors is not None
            worker.nudge()
            assert started.wait(30)
            flow.stop_intake(worker.actors)  # the first stage of the stop, on its own
            claims_landed(worker)
            finish.set()
            assert wait_until(lambda: state_of(db, "a")[0] == "complete", timeout_s=30)
            assert state_of(db, "b") == ("enqueued", 0)
        b = moves(db, "b")
    assert final["completion"]["claimed_eagerly"] == 0
    assert b == [
        (None, "pending", 0, "submitted"),
        ("pending", "enqueued", 0, "dependencies complete"),
    ]


def test_an_eager_claim_that_reaches_a_draining_dispatcher_is_handed_back() -> None:
    with fresh_database() as db:
        registry, started, finish = one_held_parent(db)
        with quiet_worker(db, 2, registry) as (worker, final):
            actors = worker.actors
            assert actors is not None
            worker.nudge()
            assert started.wait(30)
            # The intake stops and the Dispatcher drains, while commits still claim (as when
            # the stop's first stage could not reach the CompletionProcessor in time).
            actors.event_system.stop_intake().get(timeout=ASK_S)
            claims_landed(worker)
            actors.dispatcher.drain().get(timeout=ASK_S)
            finish.set()
            assert wait_until(lambda: len(moves(db, "b")) == 4, timeout_s=30)
            assert state_of(db, "b") == ("enqueued", 0)
        b = moves(db, "b")
    assert final["completion"]["claimed_eagerly"] == 1
    assert b[2:] == [
        ("enqueued", "in_progress", 1, "claimed"),
        ("in_progress", "enqueued", 0, "released on stop"),
    ]
