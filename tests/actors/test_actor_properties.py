"""docs/architecture.md, Guarantees 1-4, checked with hypothesis against the real actors.

Each example runs a real ``Worker`` (all six actors) on a fresh SQLite database with its own
handler and subscriber registries, drives the work to the end, stops the worker and then
checks the database, the handler log and the order in which commits and deliveries happened.

Eager dispatch is on (the default): the random DAGs make dependents ready in most commits, and
those commits claim some of them in their own transaction. Those claims are checked like any
other (one claim and one settlement per attempt, by the same worker, each attempt run once),
and for what is theirs alone: claimed in the transaction that made the step ready, one per
parent the commit completed, at most one per slot, and counted by the intake.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from duplex.errors import PermanentError, RetryableError
from duplex.handlers import HandlerRegistry, StepContext
from duplex.messages import DomainEvent
from duplex.states import STEP_TRANSITIONS
from duplex.storage.models import domain_events, workflow_step_transitions, workflow_steps
from duplex.storage.results import CommitReport
from duplex.subscriptions import SubscriberRegistry
from tests.actors.support import Gauge, Waves, fresh_database, running_worker, submit
from tests.conftest import open_work, wait_until

EXAMPLES = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# Random workloads are the broadest check: enough of them that some have more ready steps than
# slots, and sleep long enough, for a broken limit to show (about a second each).
WORKLOAD_EXAMPLES = settings(EXAMPLES, max_examples=40)
# Steps whose plan has a timeout get this per-step limit; their other attempts sleep <= 50 ms.
TIMEOUT_MS = 600
RESULT_STATES = ("complete", "waiting_for_retry", "error")
ERROR_TYPES = {
    "ok": None,
    "retryable": "retryable_error",
    "permanent": "permanent_error",
    "crash": "handler_error",
    "timeout": "handler_timeout",
}


def wait_while_progressing(
    done: Callable[[], bool], progress: Callable[[], object], stall_s: float = 15.0
) -> bool:
    """Wait until ``done``; give up when ``progress`` has not changed for ``stall_s``."""
    seen = progress()

    def done_or_moved() -> bool:
        return done() or progress() != seen

    while wait_until(done_or_moved, timeout_s=stall_s):
        if done():
            return True
        seen = progress()
    return False


FAILING = ("retryable", "crash", "timeout")
plans = st.builds(
    lambda fails, last, exhausted: [*fails, exhausted if last == "exhaust" else last],
    st.lists(st.sampled_from(FAILING), max_size=2),
    st.sampled_from(["ok", "ok", "permanent", "exhaust"]),
    st.sampled_from(FAILING),
)


@st.composite
def workloads(draw: st.DrawFn) -> tuple[int, list[dict[str, Any]]]:
    """A concurrency and a random DAG of steps, each with a plan and sleeps per attempt."""
    n = draw(st.integers(1, 8))
    # More steps than slots, so that a worker breaking the limit could be caught doing so.
    count = draw(st.integers(n + 1, 2 * n + 4))
    steps = []
    for i in range(count):
        plan = draw(plans)
        parents = draw(st.lists(st.integers(0, i - 1), max_size=2, unique=True)) if i else []
        steps.append(
            {
                "name": f"s{i}",
                "handler": "prop.step",
                "depends_on": [f"s{p}" for p in parents],
                "max_attempts": len(plan),
                "timeout_ms": TIMEOUT_MS if "timeout" in plan else None,
                "inputs": {
                    "plan": plan,
                    "sleep_ms": draw(st.lists(st.integers(0, 50), min_size=3, max_size=3)),
                },
            }
        )
    return n, steps


def expected_states(
    steps: list[dict[str, Any]], kind_of: Callable[[str, int], str]
) -> dict[str, tuple[str, int]]:
    """Each step's final (state, attempts): a step runs only once all its parents completed."""
    expected: dict[str, tuple[str, int]] = {}
    for step in steps:  # parents come first
        name, last = step["name"], step["max_attempts"]
        expected[name] = ("pending", 0)
        if any(expected[p][0] != "complete" for p in step["depends_on"]):
            continue
        for attempt in range(1, last + 1):
            kind = kind_of(name, attempt)
            if kind == "ok":
                expected[name] = ("complete", attempt)
                break
            if kind == "permanent" or attempt == last:
                expected[name] = ("error", attempt)
                break
    return expected


def check_transitions(rows: list[Any], step_uuid: str) -> tuple[Counter[int], Counter[int]]:
    """Walk one step's transitions in order; return claims and settlements per attempt."""
    claims: Counter[int] = Counter()
    settled: Counter[int] = Counter()
    state: str | None = None
    open_attempt: int | None = None
    for row in rows:
        assert row.from_state == state, (step_uuid, row)
        if state is not None:
            assert row.to_state in STEP_TRANSITIONS[state], (step_uuid, row)
        if row.to_state == "in_progress":
            assert open_attempt is None, f"{step_uuid}: claimed while attempt {open_attempt} open"
            open_attempt = row.attempt
            claims[row.attempt] += 1
        elif row.from_state == "in_progress":
            assert open_attempt is not None
            if row.to_state == "enqueued":  # a release hands the attempt back uncounted
                assert row.attempt == open_attempt - 1, (step_uuid, row)
            else:
                assert row.to_state in RESULT_STATES, (step_uuid, row)
                assert row.attempt == open_attempt, (step_uuid, row)
            settled[open_attempt] += 1
            open_attempt = None
        state = row.to_state
    assert open_attempt is None, f"{step_uuid}: attempt {open_attempt} never settled"
    return claims, settled


@WORKLOAD_EXAMPLES
@given(workloads())
def test_random_workloads_keep_every_guarantee(workload: tuple[int, list[dict[str, Any]]]) -> None:
    """Guarantees 1, 2 and 3 over random plans, sleeps, timeouts, DAGs and concurrency."""
    n, steps = workload
    registry, subscribers = HandlerRegistry(), SubscriberRegistry()
    gauge = Gauge()
    lock = threading.Lock()
    invocations: list[tuple[str, int]] = []
    never_cancelled: list[tuple[str, int]] = []
    # Commits (from the observer) and deliveries (from a subscriber), in the order they happened.
    sequence: list[tuple[str, str]] = []
    reports: list[CommitReport] = []

    def step(ctx: StepContext) -> dict[str, Any]:
        # A timed-out attempt gives its slot back when the Dispatcher sets its cancellation
        # flag, not when the abandoned thread finally returns: that is the moment a
        # replacement may start (the gauge stops counting it then).
        leave = gauge.enter(ctx.cancelled)
        try:
            key = (ctx.step_uuid, ctx.attempt)
            kind = ctx.inputs["plan"][ctx.attempt - 1]
            with lock:
                invocations.append(key)
            ctx.emit("test.attempt", {"attempt": ctx.attempt, "kind": kind})
            if kind == "timeout":
                if not ctx.cancelled.wait(10):
                    with lock:
                        never_cancelled.append(key)
                # Like most handlers, it does not stop the moment it is told to: its thread
                # runs on for a while beside its replacement.
                time.sleep(0.05)
                return {"late": True}
            time.sleep(ctx.inputs["sleep_ms"][ctx.attempt - 1] / 1000)
            if kind == "retryable":
                raise RetryableError("try again")
            if kind == "permanent":
                raise PermanentError("never")
            if kind == "crash":
                raise ValueError("boom")
            return {"attempt": ctx.attempt}
        finally:
            leave()

    def observer(report: CommitReport) -> None:
        with lock:
            reports.append(report)
            sequence.extend(("commit", e.event_id) for e in report.events)

    def subscriber(event: DomainEvent) -> None:
        with lock:
            sequence.append(("deliver", event.event_id))

    def committed_types() -> dict[tuple[str, int], str | None]:
        """The error type (None for success) each applied attempt was committed with."""
        with lock:
            return {
                (o.step.step_uuid, o.step.attempt): o.failure.error_type if o.failure else None
                for r in reports
                for o in r.applied
            }

    def late_results_settled() -> bool:
        # A timed-out attempt has two outcomes: the Dispatcher's timeout result and what its
        # abandoned handler returns once it sees the flag. Whichever comes second is rejected.
        stats = worker.status()
        return bool(stats["completion"]["rejected"] == stats["dispatcher"]["timeouts"])

    def all_credits_free() -> bool:
        # No credit given back twice: an intake that did not count a commit's claims would
        # get their credits back on top of its capacity (``excess``).
        intake = worker.status()["intake"]
        return bool(intake["free"] == intake["capacity"] and intake["excess"] == 0)

    registry.register("prop.step", step)
    subscribers.add("*", subscriber)
    with fresh_database() as db:
        with running_worker(db, n, registry, subscribers, observer) as (worker, final):
            task_uuid = submit(db, steps)
            worker.nudge()
            # A chain of steps whose attempts time out takes a while, but never stalls: some
            # attempt is claimed or settled at least every TIMEOUT_MS.
            assert wait_while_progressing(
                lambda: open_work(db) == 0, lambda: (len(invocations), len(reports))
            ), "work stopped before it finished"
            # Late results of timed-out attempts come back once their handlers see the flag.
            assert wait_until(late_results_settled)
            # Every credit comes back once the work is done, however the Dispatcher batched
            # them (a claim on its way holds them for a moment).
            assert wait_until(all_credits_free, timeout_s=5), worker.status()["intake"]
        with db.read() as conn:
            step_rows = {r.name: r for r in conn.execute(select(workflow_steps))}
            transitions = list(
                conn.execute(
                    select(workflow_step_transitions).order_by(workflow_step_transitions.c.id)
                )
            )
            stored_events = list(conn.execute(select(domain_events)))

    # Guarantee 1: never more than n handlers at once.
    assert gauge.peak <= n
    assert gauge.current == 0

    # Eager dispatch: every commit that made dependents ready claimed one per parent it
    # completed, at most n, in its own transaction (the claim row is stamped with the time
    # the step became ready), as this worker.
    claims_of = {(t.step_uuid, t.attempt): t for t in transitions if t.to_state == "in_progress"}
    ready_at = {t.step_uuid: t for t in transitions if t.reason == "dependencies complete"}
    for report in reports:
        expected_claims = min(len(report.ready), report.parents_completed, n)
        assert len(report.claimed) == expected_claims, (report.ready, report.claimed)
        for claimed in report.claimed:
            claim, ready = (
                claims_of[(claimed.step_uuid, claimed.attempt)],
                ready_at[claimed.step_uuid],
            )
            assert claim.created_at == ready.created_at, (claim, ready)
            assert claim.worker_id == worker.worker_id == claimed.claimed_by
    if any(report.ready for report in reports):
        assert final["completion"]["claimed_eagerly"] > 0
    assert final["completion"]["claimed_eagerly"] == sum(len(r.claimed) for r in reports)
    for row in transitions:
        if row.to_state == "in_progress" or row.from_state == "in_progress":
            assert row.worker_id == worker.worker_id, row

    assert all(r.task_uuid == task_uuid for r in step_rows.values())

    # Every step ends where its plan says; none is lost or left running. On a busy machine a
    # quick attempt may still overrun a step's timeout: then it counts as a timeout.
    committed = committed_types()
    uuid_of = {name: r.step_uuid for name, r in step_rows.items()}
    plan_of = {step["name"]: step["inputs"]["plan"] for step in steps}
    for (step_uuid, attempt), error_type in committed.items():
        planned = next(p for n, p in plan_of.items() if uuid_of[n] == step_uuid)[attempt - 1]
        assert error_type in (ERROR_TYPES[planned], "handler_timeout"), (planned, error_type)

    def kind_of(name: str, attempt: int) -> str:
        if committed.get((uuid_of[name], attempt)) == "handler_timeout":
            return "timeout"
        return str(plan_of[name][attempt - 1])

    expected = expected_states(steps, kind_of)
    assert {name: (r.state, r.attempts) for name, r in step_rows.items()} == expected

    # Guarantee 3: every claimed attempt has exactly one committed outcome, and each attempt
    # ran its handler exactly once.
    assert not never_cancelled
    calls = Counter(invocations)
    assert all(times == 1 for times in calls.values()), calls
    by_uuid = {r.step_uuid: r for r in step_rows.values()}
    for step_uuid, row in by_uuid.items():
        claims, settled = check_transitions(
            [t for t in transitions if t.step_uuid == step_uuid], step_uuid
        )
        attempts = set(range(1, row.attempts + 1))
        assert claims == Counter(dict.fromkeys(attempts, 1)), (row.name, claims)
        assert settled == claims, (row.name, settled)
        assert {a for s, a in calls if s == step_uuid} == attempts, row.name
    applied = {(o.step.step_uuid, o.step.attempt): o for r in reports for o in r.applied}
    assert Counter(applied.keys()) == calls
    assert sum(len(r.applied) for r in reports) == len(applied)
    # Each attempt the Dispatcher timed out has exactly two outcomes, its timeout result and the
    # handler's late one; the first to arrive is applied, the other rejected. (Nearly always the
    # timeout result is first; a quick attempt overrunning its limit on a busy machine may race.)
    rejected = [o for r in reports for o in r.rejected]
    assert final["dispatcher"]["timeouts"] == len(rejected)
    rejected_keys = Counter((o.step.step_uuid, o.step.attempt) for o in rejected)
    assert all(times == 1 for times in rejected_keys.values()), rejected_keys
    for late in rejected:
        first = applied[(late.step.step_uuid, late.step.attempt)]
        kinds = [o.failure.error_type if o.failure else None for o in (first, late)]
        assert "handler_timeout" in kinds, (first, late)
    timed_out = {k for k, t in committed_types().items() if t == "handler_timeout"}
    assert timed_out <= set(rejected_keys)
    assert final["dispatcher"]["abandoned_threads"] == 0

    # The outbox holds each applied attempt's events once; a timed-out attempt's own events
    # died with its rejected late result.
    stored = Counter((e.step_uuid, e.name) for e in stored_events)
    for name, (state, ran) in expected.items():
        kinds = [kind_of(name, attempt) for attempt in range(1, ran + 1)]
        step_uuid = uuid_of[name]
        assert stored[(step_uuid, "test.attempt")] == sum(k != "timeout" for k in kinds), name
        assert stored[(step_uuid, "step.completed")] == (state == "complete"), name
        assert stored[(step_uuid, "step.failed")] == ran - (state == "complete"), name

    # Guarantee 2: each event is delivered once, and only after the commit that holds it.
    committed_at: dict[str, int] = {}
    delivered: Counter[str] = Counter()
    for index, (what, event_id) in enumerate(sequence):
        if what == "commit":
            assert event_id not in committed_at
            committed_at[event_id] = index
        else:
            assert committed_at.get(event_id, index) < index, f"{event_id} delivered first"
            delivered[event_id] += 1
    assert set(committed_at) == {e.event_id for e in stored_events}
    assert delivered == Counter(committed_at.keys())


@EXAMPLES
@given(st.integers(1, 8))
def test_enough_ready_work_fills_every_slot(n: int) -> None:
    """Guarantee 1: with 3n slow ready steps, exactly n handlers run at once, never n + 1.

    Handlers stay in their slots, wave after wave, until every attempt the Dispatcher has
    started is inside its handler. A Dispatcher that started one attempt too many would have
    the extra one counted alongside the n others, whenever it started it.
    """
    registry = HandlerRegistry()
    gauge = Gauge()
    waves = Waves()
    held: list[bool] = []
    # (running, waiting) as the Dispatcher reported them when a wave was let go.
    released: list[tuple[int, int]] = []

    def hold(ctx: StepContext) -> None:
        leave = gauge.enter(ctx.cancelled)
        try:
            held.append(waves.hold(20.0))
        finally:
            leave()

    registry.register("prop.hold", hold)
    with fresh_database() as db, running_worker(db, n, registry) as (worker, _):
        submit(db, [{"name": f"h{i}", "handler": "prop.hold"} for i in range(3 * n)])
        worker.nudge()

        def release_a_full_wave() -> bool:
            if open_work(db) == 0:
                return True
            stats = worker.status()["dispatcher"]
            # Until a wave is let go nobody leaves, so this is every started attempt entered.
            if stats["running"] and gauge.current >= stats["running"]:
                released.append((stats["running"], stats["waiting"]))
                waves.release()
            return False

        assert wait_until(release_a_full_wave, timeout_s=120)
    assert gauge.peak == n
    assert held == [True] * (3 * n)
    # The first wave had more ready work than slots, and every slot was busy.
    assert released[0][0] == n
    assert released[0][1] > 0
    assert max(running for running, _ in released) == n


@EXAMPLES
@given(st.integers(1, 6))
def test_blocked_completion_path_never_stops_handlers(n: int) -> None:
    """Guarantee 4: while the CompletionProcessor is stuck, all 3n steps still run."""
    registry = HandlerRegistry()
    lock = threading.Lock()
    started: list[str] = []
    finished: list[str] = []
    completion_blocked = threading.Event()
    unblock = threading.Event()
    calls = 0

    def quick(ctx: StepContext) -> dict[str, str]:
        with lock:
            started.append(ctx.step_name)
            first = len(started) == 1
        if not first:
            # Everyone but the first waits until the completion path is stuck, so all of
            # them provably start while it is.
            completion_blocked.wait(10)
        with lock:
            finished.append(ctx.step_name)
        return {"step": ctx.step_name}

    def observer(report: CommitReport) -> None:
        # Runs on the CompletionProcessor's thread: blocking here blocks the whole actor.
        nonlocal calls
        calls += 1
        if calls == 1:
            completion_blocked.set()
            unblock.wait(30)

    registry.register("prop.quick", quick)
    with fresh_database() as db:
        with running_worker(db, n, registry, observer=observer) as (worker, final):
            try:
                submit(db, [{"name": f"q{i}", "handler": "prop.quick"} for i in range(3 * n)])
                worker.nudge()
                assert completion_blocked.wait(10)
                ran_while_blocked = wait_until(lambda: len(finished) == 3 * n, timeout_s=15)
                still_blocked = not unblock.is_set()
            finally:
                unblock.set()
            assert ran_while_blocked, f"only {len(finished)} of {3 * n} handlers ran"
            assert still_blocked
            assert wait_until(lambda: open_work(db) == 0)
        with db.read() as conn:
            rows = list(conn.execute(select(workflow_steps.c.state, workflow_steps.c.attempts)))
    assert sorted(started) == sorted(f"q{i}" for i in range(3 * n))
    assert [tuple(r) for r in rows] == [("complete", 1)] * (3 * n)
    assert final["completion"]["committed"] == 3 * n
