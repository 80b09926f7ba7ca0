"""Flow control through the real actors: concurrency keys keep a long backlog from starving
another key, and a rate limit spaces starts while the worker looks for tokens only when they
come (docs/flow-control.md).

The moments are made, not waited for: the backlog's handlers are held on a gate until the
other key is done, and the other key's first handler waits until a second one is inside; the
poll comes once a minute, so what wakes the intake for tokens is the claim's own ``look_at``.

Each test was checked against a deliberately broken worker (see the report of the change that
added this file): ``admit`` admitting every candidate whatever its key's count, and a
StepExecutor that never tells the intake when tokens come.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from duplex.clock import utcnow
from duplex.flow.rates import parse_rate
from duplex.handlers import HandlerRegistry, StepContext
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.models import workflow_step_transitions, workflow_steps
from duplex.storage.rate_limits import set_limit
from duplex.storage.submission import create_tasks
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import TaskTemplate
from duplex.worker.wiring import Worker
from tests.actors.support import fresh_database
from tests.conftest import make_settings, open_work, wait_until
from tests.storage.support import starts_in_windows

ASK_S = 10.0
HOLD_S = 120.0
ws = workflow_steps


@contextmanager
def flow_worker(
    db: Database, slots: int, registry: HandlerRegistry, **event_system: Any
) -> Iterator[Worker]:
    """A worker with ``slots`` slots (handlers may be held for up to ``HOLD_S``); stopped on
    exit."""
    worker = Worker(
        make_settings(
            str(db.url),
            worker={"max_concurrent_handlers": slots, "handler_timeout_ms": int(HOLD_S * 1000)},
            event_system={"polling_interval_ms": 20, **event_system},
        ),
        db,
        registry=registry,
        subscribers=SubscriberRegistry(),
    )
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def submit_all(db: Database, step: dict[str, Any], contexts: Sequence[dict[str, Any]]) -> None:
    """One single-step task per context, in one transaction."""
    template = TaskTemplate.model_validate({"name": step["name"], "steps": [step]})
    with db.write() as conn:
        create_tasks(conn, template, list(contexts), now=utcnow())


def states_of(db: Database, name: str) -> Counter[str]:
    with db.read() as conn:
        return Counter(conn.execute(select(ws.c.state).where(ws.c.name == name)).scalars())


def moves_to(db: Database, name: str, to_state: str, column: Any) -> list[Any]:
    """``column`` of every transition of the steps called ``name`` into ``to_state``."""
    t = workflow_step_transitions
    with db.read() as conn:
        return list(
            conn.execute(
                select(column)
                .join(ws, ws.c.step_uuid == t.c.step_uuid)
                .where(ws.c.name == name, t.c.to_state == to_state)
            ).scalars()
        )


@dataclass
class KeyGauge:
    """Per customer: handlers inside now, the most ever inside at once, starts and finishes."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)
    inside: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)
    started: Counter[str] = field(default_factory=Counter)
    finished: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def enter(self, key: str) -> None:
        with self.lock:
            self.inside[key] += 1
            self.started[key] += 1
            self.peak[key] = max(self.peak[key], self.inside[key])
            self.changed.notify_all()

    def leave(self, key: str) -> None:
        with self.lock:
            self.inside[key] -= 1
            self.finished[key] += 1
            self.changed.notify_all()

    def snapshot(self) -> tuple[Counter[str], Counter[str], Counter[str]]:
        with self.lock:
            return Counter(self.peak), Counter(self.started), Counter(self.finished)


# --- concurrency keys: a long backlog does not starve another key --------------------------------


def test_a_key_with_a_long_backlog_does_not_starve_another_key() -> None:
    """Key A has 1,000 ready steps (limit 2), submitted before key B's 10 (limit 2), on a
    worker with 6 slots. A's handlers are held on a gate, so A never frees a slot: B's steps
    complete only if claims look past A's backlog (held back to ``waiting``). B's first handler
    waits until a second B is inside, so B reaches its limit; 4 slots are free for B, so only
    the key keeps it at 2. Then the gate opens and A's backlog drains, 2 at a time."""
    backlog, others, limit, slots = 1000, 10, 2, 6
    gauge = KeyGauge()
    gate = threading.Event()

    def a_step(ctx: StepContext) -> dict[str, Any]:
        gauge.enter("A")
        try:
            assert gate.wait(HOLD_S)
            return {}
        finally:
            gauge.leave("A")

    def b_step(ctx: StepContext) -> dict[str, Any]:
        gauge.enter("B")
        try:
            # The first B waits for a second one: B reaches its limit at least once.
            with gauge.changed:
                assert gauge.changed.wait_for(lambda: gauge.peak["B"] >= limit, HOLD_S)
            return {}
        finally:
            gauge.leave("B")

    registry = HandlerRegistry()
    registry.register("flow.a", a_step)
    registry.register("flow.b", b_step)
    keyed = {"concurrency": {"key": "context.customer", "limit": limit}}
    with fresh_database() as db, ExitStack() as stack:
        # A first: its 1,000 steps are ahead of B's in the claim order.
        submit_all(db, {"name": "a", "handler": "flow.a", **keyed}, [{"customer": "A"}] * backlog)
        submit_all(db, {"name": "b", "handler": "flow.b", **keyed}, [{"customer": "B"}] * others)
        began = time.monotonic()
        worker = stack.enter_context(flow_worker(db, slots, registry))
        stack.callback(gate.set)  # whatever happens, nothing is held at the stop
        worker.nudge()

        assert wait_until(lambda: states_of(db, "b")["complete"] == others, timeout_s=30), (
            states_of(db, "b"),
            gauge.snapshot(),
        )
        b_done_s = time.monotonic() - began
        # A's two claimed steps are in their handlers (or on their way there), held on the gate.
        assert wait_until(lambda: gauge.snapshot()[1]["A"] >= limit, timeout_s=30)
        peak, started, finished = gauge.snapshot()
        a_states = states_of(db, "a")
        held_reasons = set(moves_to(db, "a", "waiting", workflow_step_transitions.c.reason))
        # B is done while A has completed nothing (far below a tenth of its backlog), and
        # neither key ever had more than its limit inside the handlers.
        assert (started["B"], finished["B"]) == (others, others)
        assert finished["A"] == 0 < backlog // 10
        assert started["A"] == limit
        assert (peak["A"], peak["B"]) == (limit, limit)
        # A's backlog is held back, not claimed: 2 running, the rest waiting (or not yet
        # reached by a claim), none complete.
        assert a_states["in_progress"] == limit
        assert a_states["complete"] == 0
        assert a_states["waiting"] > 0
        assert held_reasons == {"held by concurrency key context.customer=A: 2 running, limit 2"}

        gate.set()
        assert wait_until(lambda: open_work(db) == 0, timeout_s=120), states_of(db, "a")
        all_done_s = time.monotonic() - began
        peak, started, finished = gauge.snapshot()
        a_states, b_states = states_of(db, "a"), states_of(db, "b")
    assert a_states == Counter({"complete": backlog})
    assert b_states == Counter({"complete": others})
    assert (started["A"], finished["A"]) == (backlog, backlog)
    assert (peak["A"], peak["B"]) == (limit, limit)
    print(f"B done after {b_done_s:.2f} s; everything after {all_done_s:.2f} s")


# --- rate limits: starts spaced, and the worker looks when the tokens come -----------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_rate_limit_spaces_starts_and_the_worker_does_not_poll_for_tokens(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """15 no-op steps under a limit of 10/s (burst 0) on a worker that polls once a minute
    (PostgreSQL: event-driven, whose safety poll is slower still). They all run within a few
    seconds, so the worker looked when the tokens came; every second holds at most 10 starts
    by the claims' times (when the tokens are taken), and by the handlers' clock give or take
    the hand-off to a slot; and there are a few claims per start, not a busy loop."""
    rate, burst, steps, slots = 10, 0, 15, 4
    lock = threading.Lock()
    # Each start as the handler sees it: its clock, and its attempt's claim time.
    starts: list[tuple[float, datetime]] = []
    claims = 0

    def counted_claim(*args: Any, **kwargs: Any) -> Any:
        nonlocal claims
        with lock:
            claims += 1
        return claim_ready_steps(*args, **kwargs)

    # Every claim transaction of the intake goes through the Claimer's claim_ready_steps.
    monkeypatch.setattr("duplex.intake.claimer.claim_ready_steps", counted_claim)

    def paced(ctx: StepContext) -> dict[str, Any]:
        assert ctx.claim is not None
        assert ctx.claim.claimed_at is not None
        with lock:
            starts.append((time.monotonic(), ctx.claim.claimed_at))
        return {}

    registry = HandlerRegistry()
    registry.register("flow.paced", paced)
    registry.register("flow.warm", lambda ctx: {})
    event_system: dict[str, Any] = {"polling_interval_ms": 60_000}
    with ExitStack() as stack:
        if backend == "sqlite":
            db = stack.enter_context(fresh_database())
        else:
            db = request.getfixturevalue("postgres_db")
            event_system["deployment_mode"] = "event_driven"
        with db.write() as conn:
            set_limit(conn, "paced", parse_rate(f"{rate}/s", burst), now=utcnow(), operator="t")
        worker = stack.enter_context(flow_worker(db, slots, registry, **event_system))
        actors = worker.actors
        assert actors is not None
        assert wait_until(lambda: actors.event_system.listener_settled().get(timeout=ASK_S))
        # A step without a limit first: the handler threads exist and the first look is over.
        submit_all(db, {"name": "warm", "handler": "flow.warm"}, [{}])
        worker.nudge()
        assert wait_until(lambda: open_work(db) == 0, timeout_s=30)
        with lock:
            claims_before = claims

        submit_all(db, {"name": "p", "handler": "flow.paced", "rate_limit": "paced"}, [{}] * steps)
        began = time.monotonic()
        worker.nudge()
        # 15 starts at 10/s take 1.4 s from the first; the next poll is a minute away, so
        # finishing well within it means the worker looked when the tokens came.
        finished = wait_until(lambda: open_work(db) == 0, timeout_s=30)
        took_s = time.monotonic() - began
        with lock:
            handler_starts, claims_made = list(starts), claims - claims_before
        claimed_at = moves_to(db, "p", "in_progress", workflow_step_transitions.c.created_at)
        p_states = states_of(db, "p")
    ran_s = sorted(ran for ran, _ in handler_starts)
    closest = min((b - a for a, b in zip(ran_s, ran_s[rate + burst :], strict=False)), default=None)
    print(
        f"{backend}: {len(handler_starts)} starts in {took_s:.2f} s, {claims_made} claims; "
        f"states {dict(p_states)}; {rate + burst + 1} handler starts at least {closest} s apart"
    )
    assert finished, (p_states, len(handler_starts), took_s)
    assert p_states == Counter({"complete": steps})
    assert took_s < 30.0
    assert len(handler_starts) == len(claimed_at) == steps
    # A start takes its tokens at its claim's time, which each handler reads from its attempt
    # (and the claim transitions record): in every window of one second, at most 10, exactly.
    first = min(claimed_at)
    assert sorted(at for _, at in handler_starts) == sorted(claimed_at)
    claim_s = sorted((at - first).total_seconds() for at in claimed_at)
    assert starts_in_windows(claimed_at, timedelta(seconds=1)) <= rate + burst
    assert claim_s[-1] >= (steps - 1 - burst) / rate  # and no stricter than the rate
    # (By the handlers' own clock a start comes after its claim by however long the hand-off
    # to a slot takes, unbounded on a loaded machine: the rate is the claims', as documented.)
    # A look or two per start, not a loop polling for tokens: a look at a step's expected
    # time may find the token just taken (a start came a little late), and defers it again.
    # (Polling for tokens would be hundreds of claims per start.)
    assert claims_made <= 6 * steps
