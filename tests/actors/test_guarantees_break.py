"""Guarantees that only show when they are broken: backpressure, the stop, the SQL guard.

Each test here was checked against a deliberately broken worker (see the report of the change
that added this file): without commit-lag backpressure, without the stop's wait for commits,
with a publisher that drops its queue on stop, and with the result commit's SQL guard removed.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Row, func, select, text

import duplex.storage.results as commits
from duplex.clock import utcnow
from duplex.commit.retry import RetryPolicy
from duplex.errors import HANDLER_TIMEOUT, StorageError
from duplex.handlers import HandlerRegistry, StepContext
from duplex.messages import ClaimedStep, DomainEvent, Status, StepFailure, StepOutcome
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.models import domain_events, workflow_step_transitions, workflow_steps
from duplex.storage.releases import release_claims
from duplex.subscriptions import SubscriberRegistry
from tests.actors.support import fresh_database, running_worker, submit
from tests.conftest import open_work, wait_until

ASK_S = 10.0


def step_states(db: Database) -> dict[str, str]:
    with db.read() as conn:
        return dict(conn.execute(select(workflow_steps.c.name, workflow_steps.c.state)).all())


def in_progress(db: Database) -> int:
    with db.read() as conn:
        query = select(func.count()).where(workflow_steps.c.state == "in_progress")
        return int(conn.execute(query).scalar_one())


def event_ids(db: Database) -> set[str]:
    with db.read() as conn:
        return set(conn.execute(select(domain_events.c.event_id)).scalars())


# --- guarantee 5: commits that lag pause the intake ---------------------------------------------


def close_the_commit_gate(db: Database) -> Callable[[], None]:
    """Make the database refuse every result commit (a step leaving ``in_progress``) until
    the returned function is called. Claims still work: they move steps *into* in_progress.

    The worker sees an outage of its result commits only: it keeps the results and retries,
    and its actors stay responsive, as they would with a database that is slow to write.
    """
    with db.write() as conn:
        conn.execute(text("CREATE TABLE commit_gate (closed INTEGER NOT NULL)"))
        conn.execute(text("INSERT INTO commit_gate VALUES (1)"))
        conn.execute(
            text(
                "CREATE TRIGGER results_wait_for_the_gate BEFORE UPDATE OF state ON workflow_steps"
                " WHEN OLD.state = 'in_progress' AND NEW.state <> 'enqueued'"
                " AND (SELECT closed FROM commit_gate) = 1"
                " BEGIN SELECT RAISE(ABORT, 'commit gate closed'); END"
            )
        )

    def open_gate() -> None:
        with db.write() as conn:
            conn.execute(text("UPDATE commit_gate SET closed = 0"))

    return open_gate


def test_commits_that_lag_pause_the_intake() -> None:
    """Guarantees 4 and 5: once a batch of results waits for the database, intake pauses.

    Handlers outrun commits (here commits fail until the gate opens), but the worker does not
    claim the whole queue: it holds a batch of results, plus a few claims' worth that were
    already running, on their way, or queued at the CompletionProcessor while it was busy
    trying a commit (how many of those depends on thread timing; 2 slots + 2 prefetch and
    batches of 4 have held 5 to 13 steps, a broken pause claims all 100).
    """
    slots, prefetch, batch, total = 2, 2, 4, 100
    bound = batch + 4 * (slots + prefetch)
    registry = HandlerRegistry()
    registry.register("lag.quick", lambda ctx: {"step": ctx.step_name})
    with fresh_database() as db:
        open_gate = close_the_commit_gate(db)
        settings = {"prefetch": prefetch, "commit_batch_size": batch, "commit_linger_ms": 0}
        with running_worker(db, slots, registry, worker_settings=settings) as (worker, final):
            actors = worker.actors
            assert actors is not None
            try:
                submit(db, [{"name": f"q{i}", "handler": "lag.quick"} for i in range(total)])
                worker.nudge()

                def settled() -> bool:
                    """Over the bound, or quiet: every claimed step's result is held, and a
                    nudge with every slot free claims nothing more."""
                    # Nothing leaves in_progress and no result is committed while the gate
                    # is closed, so both counts only grow; read the held results first.
                    held_results = actors.completion.stats().get(timeout=ASK_S)["buffered"]
                    claimed = in_progress(db)
                    if claimed > bound:
                        return True
                    # Fewer than a batch held never pauses the intake; and a nudge that meets
                    # a claim on its way (one that looked before the submission) is served
                    # only when that claim returns, so "nothing more claimed" means nothing yet.
                    if claimed < batch or held_results != claimed:
                        return False
                    # Every slot freed by those results has been reported to the intake...
                    dispatcher = actors.dispatcher.stats().get(timeout=ASK_S)
                    if dispatcher["running"] or dispatcher["waiting"]:
                        return False
                    # ...so a nudge now claims at once, unless the intake is paused.
                    actors.event_system.nudge().get(timeout=ASK_S)
                    actors.command_processor.handle(Status()).get(timeout=ASK_S)
                    return bool(actors.step_executor.claimed_total.get(timeout=ASK_S) == claimed)

                assert wait_until(settled, timeout_s=60)
                held = in_progress(db)
                stats = worker.status()
            finally:
                open_gate()
            assert held <= bound, f"{held} of {total} steps claimed while commits failed"
            assert stats["completion"]["commit_failing"]
            assert stats["completion"]["buffered"] == held
            assert held >= batch
            # Once commits succeed again, the intake resumes and everything runs.
            assert wait_until(lambda: open_work(db) == 0, timeout_s=60)
        assert set(step_states(db).values()) == {"complete"}
    assert final["completion"]["committed"] == total


# --- guarantee 7: nothing lost on stop -----------------------------------------------------------


def test_stop_commits_every_result_it_holds() -> None:
    """Guarantee 7: results still lingering in the CompletionProcessor are committed by the
    stop, with the result of a handler that was still running when the stop began; and their
    events are delivered."""
    registry, subscribers = HandlerRegistry(), SubscriberRegistry()
    lock = threading.Lock()
    returned: list[str] = []
    completed: list[str] = []
    slow_started, let_slow_finish = threading.Event(), threading.Event()

    def quick(ctx: StepContext) -> dict[str, str]:
        with lock:
            returned.append(ctx.step_name)
        return {"step": ctx.step_name}

    def slow(ctx: StepContext) -> dict[str, str]:
        slow_started.set()
        let_slow_finish.wait(30)
        return {"step": ctx.step_name}

    def on_completed(event: DomainEvent) -> None:
        with lock:
            completed.append(event.payload["step_name"])

    registry.register("stop.quick", quick)
    registry.register("stop.slow", slow)
    subscribers.add("step.completed", on_completed)
    names = [f"q{i}" for i in range(6)]
    # A second's linger: the results are still held when the stop begins.
    settings = {"commit_linger_ms": 1000, "shutdown_timeout_ms": 30_000}
    with fresh_database() as db:
        with running_worker(db, 3, registry, subscribers, worker_settings=settings) as (
            worker,
            final,
        ):
            actors = worker.actors
            assert actors is not None
            submit(
                db,
                [{"name": "slow", "handler": "stop.slow"}]
                + [{"name": name, "handler": "stop.quick"} for name in names],
            )
            worker.nudge()
            assert slow_started.wait(30)
            assert wait_until(lambda: len(returned) == len(names))

            def finish_slow_once_draining() -> None:
                wait_until(lambda: actors.dispatcher.stats().get(timeout=ASK_S)["draining"])
                let_slow_finish.set()

            releaser = threading.Thread(target=finish_slow_once_draining)
            releaser.start()
        releaser.join(30)
        assert let_slow_finish.is_set()
        states = step_states(db)
    assert states == dict.fromkeys(["slow", *names], "complete")
    # Committed by the stop itself, in time for their events to be delivered before it ended.
    assert sorted(completed) == sorted(["slow", *names])
    assert final["uncommitted"] == 0
    assert final["completion"]["buffered"] == 0
    assert final["completion"]["committed"] == len(names) + 1


def test_stop_delivers_every_committed_event_to_a_slow_subscriber() -> None:
    """Guarantee 7: the events committed just before the stop are all delivered, however
    slow the subscriber, before ``Worker.stop`` returns."""
    registry, subscribers = HandlerRegistry(), SubscriberRegistry()
    lock = threading.Lock()
    delivered: list[str] = []
    stopping = threading.Event()

    def chatty(ctx: StepContext) -> None:
        ctx.emit("chat.one", {"n": 1})
        ctx.emit("chat.two", {"n": 2})

    def slow_subscriber(event: DomainEvent) -> None:
        # Nothing is delivered before the stop begins: the queue is full of committed events.
        stopping.wait(30)
        time.sleep(0.02)
        with lock:
            delivered.append(event.event_id)

    registry.register("chat.step", chatty)
    subscribers.add("*", slow_subscriber)
    steps = 10
    with fresh_database() as db:
        with running_worker(db, 4, registry, subscribers) as (worker, final):
            submit(db, [{"name": f"c{i}", "handler": "chat.step"} for i in range(steps)])
            worker.nudge()
            assert wait_until(lambda: open_work(db) == 0)
            # Two events of its own and step.completed per step, all committed and queued.
            committed = event_ids(db)
            assert len(committed) == 3 * steps
            assert wait_until(lambda: worker.status()["events"]["published"] == len(committed))
            stopping.set()
        with lock:
            assert sorted(delivered) == sorted(committed)
    assert final["events"]["dropped"] == 0


# --- guarantee 3: the result commit is guarded in SQL, not only in Python ------------------------

POLICY = RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=60_000, jitter=0.0)


def claim(db: Database, worker: str, now: Any) -> list[ClaimedStep]:
    with db.write() as conn:
        return claim_ready_steps(conn, worker_id=worker, namespaces=("default",), limit=10, now=now)


def claim_both(db: Database, now: Any) -> tuple[ClaimedStep, ClaimedStep]:
    """Claim the steps "stale" and "live" as worker w1."""
    by_name = {step.name: step for step in claim(db, "w1", now)}
    return by_name["stale"], by_name["live"]


def commit(db: Database, outcomes: list[StepOutcome], now: Any) -> commits.CommitReport:
    with db.write() as conn:
        return commits.commit_outcomes(conn, outcomes, policy=POLICY, now=now, rng=random.Random(0))


def snapshot(db: Database) -> tuple[dict[str, dict[str, Any]], int, int]:
    """Every step row, and how many transitions and domain events exist."""
    with db.read() as conn:
        rows: list[Row[Any]] = list(conn.execute(select(workflow_steps)))
        transitions = conn.execute(
            select(func.count()).select_from(workflow_step_transitions)
        ).scalar_one()
        events = conn.execute(select(func.count()).select_from(domain_events)).scalar_one()
    return {row.name: dict(row._mapping) for row in rows}, int(transitions), int(events)


def stale_settled(db: Database, now: Any) -> tuple[StepOutcome, ClaimedStep]:
    """The step's attempt was already settled: a duplicate of its result."""
    stale_step, live = claim_both(db, now)
    commit(db, [StepOutcome(stale_step, now, now, result={"first": True})], now)
    return StepOutcome(stale_step, now, now, result={"again": True}), live


def stale_retried(db: Database, now: Any) -> tuple[StepOutcome, ClaimedStep]:
    """The attempt timed out and the step was claimed again (attempt 2): its late result."""
    stale_step, live = claim_both(db, now)
    timeout = StepFailure(HANDLER_TIMEOUT, "timed out", retryable=True)
    commit(db, [StepOutcome(stale_step, now, now, failure=timeout)], now)
    (again,) = claim(db, "w1", now + timedelta(hours=1))
    assert (again.step_uuid, again.attempt) == (stale_step.step_uuid, 2)
    return StepOutcome(stale_step, now, now, result={"late": True}), live


def stale_reclaimed_elsewhere(db: Database, now: Any) -> tuple[StepOutcome, ClaimedStep]:
    """The claim went back to the queue and another worker claimed the same attempt number."""
    stale_step, live = claim_both(db, now)
    with db.write() as conn:
        release_claims(conn, [stale_step], worker_id="w1", now=now, reason="test")
    (again,) = claim(db, "w2", now)
    assert (again.step_uuid, again.attempt, again.claimed_by) == (stale_step.step_uuid, 1, "w2")
    return StepOutcome(stale_step, now, now, result={"impostor": True}), live


@pytest.mark.parametrize(
    "make_stale",
    [stale_settled, stale_retried, stale_reclaimed_elsewhere],
    ids=["state", "attempt", "claimant"],
)
def test_sql_guard_rejects_a_stale_result_the_python_check_let_through(
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    make_stale: Callable[[Database, Any], tuple[StepOutcome, ClaimedStep]],
) -> None:
    """Guarantee 3: the update of a result is guarded in SQL (state, attempt and claimant),
    so a stale result that got past the Python pre-check changes nothing, and the batch
    that held it is rolled back whole."""
    submit(db, [{"name": "stale", "handler": "t.x"}, {"name": "live", "handler": "t.x"}])
    now = utcnow()
    stale, live = make_stale(db, now)
    assert stale.step.name == "stale"
    assert live.name == "live"
    before = snapshot(db)

    real_read = commits._lock_tasks_and_read_claims

    def claims_held_says_yes(conn: Any, outcomes: Any) -> Any:
        task_states, held = real_read(conn, outcomes)
        held[stale.step.step_uuid] = (stale.step.attempt, stale.step.claimed_by)
        return task_states, held

    monkeypatch.setattr(commits, "_lock_tasks_and_read_claims", claims_held_says_yes)
    good = StepOutcome(live, now, now, result={"good": True})
    with pytest.raises(StorageError, match="rolled back"):
        commit(db, [good, stale], now)
    # Neither the stale row nor the good one in the same batch changed; nothing was added.
    assert snapshot(db) == before

    monkeypatch.undo()
    # Retried without the pre-check's blind spot, the good result lands and the stale one is
    # rejected by the pre-check.
    report = commit(db, [good, stale], now)
    assert report.applied == [good]
    assert report.rejected == [stale]
    rows, _, _ = snapshot(db)
    assert rows["stale"] == before[0]["stale"]
    assert (rows["live"]["state"], rows["live"]["results"]) == ("complete", {"good": True})


@pytest.mark.parametrize("late_first", [True, False], ids=["late-first", "late-second"])
def test_a_late_result_in_the_same_batch_does_not_cost_the_current_attempt(
    db: Database, late_first: bool
) -> None:
    """Guarantee 3: a timed-out attempt's late result may reach the commit in the same batch as
    the next attempt's result (a handler that stops a little after its flag is set). The late
    one is rejected; the current one is applied, not rejected with it."""
    submit(db, [{"name": "retried", "handler": "t.x"}])
    now = utcnow()
    (first,) = claim(db, "w1", now)
    timeout = StepFailure(HANDLER_TIMEOUT, "timed out", retryable=True)
    commit(db, [StepOutcome(first, now, now, failure=timeout)], now)
    later = now + timedelta(hours=1)
    (second,) = claim(db, "w1", later)
    assert second.attempt == 2
    late = StepOutcome(first, now, later, result={"late": True})
    on_time = StepOutcome(second, later, later, result={"on_time": True})
    report = commit(db, [late, on_time] if late_first else [on_time, late], later)
    assert report.applied == [on_time]
    assert report.rejected == [late]
    rows, _, _ = snapshot(db)
    assert (rows["retried"]["state"], rows["retried"]["results"]) == ("complete", {"on_time": True})
