"""How long an attempt took, as ``duplex status`` (text and ``--json``) and the dashboard
show it: both read it from the transition rows through ``duplex.attempts``, so they agree, and
neither a timeout nor an operator's later move changes what the attempt itself took.
"""

from __future__ import annotations

import random
import re
import threading
import uuid
from datetime import UTC, datetime, timedelta

from duplex.cli.console import duration, make_console, steps_table
from duplex.clock import utcnow
from duplex.commit.retry import RetryPolicy
from duplex.dashboard.pages import step_view, task_view
from duplex.handlers import HandlerRegistry, StepContext
from duplex.messages import ClaimedStep, StepFailure, StepOutcome
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.operations import resolve_step
from duplex.storage.queries import task_steps
from duplex.storage.results import commit_outcomes
from duplex.storage.submission import create_task
from duplex.templates import parse_template
from tests.actors.support import running_worker, step_row, submit

T0 = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)
NO_BACKOFF = RetryPolicy(base_ms=60_000, multiplier=1.0, max_ms=60_000, jitter=0.0)


def one_step_task(db: Database, *, max_attempts: int) -> tuple[str, str]:
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    template = parse_template(
        f'name = "d"\nnamespace = "{namespace}"\n'
        f'[[steps]]\nname = "only"\nhandler = "t.h"\nmax_attempts = {max_attempts}\n'
    )
    with db.write() as conn:
        task = create_task(conn, template, {}, now=T0)
    return task, namespace


def claim(db: Database, namespace: str, at: datetime) -> ClaimedStep:
    with db.write() as conn:
        (step,) = claim_ready_steps(conn, worker_id="w1", namespaces=[namespace], limit=5, now=at)
    return step


def fail(db: Database, step: ClaimedStep, at: datetime, *, retryable: bool) -> None:
    failure = StepFailure("handler_error" if retryable else "permanent_error", "no", retryable)
    outcome = StepOutcome(step, at, at, failure=failure)
    with db.write() as conn:
        commit_outcomes(conn, [outcome], policy=NO_BACKOFF, now=at, rng=random.Random(0))


def test_a_resolved_step_shows_its_last_attempt_not_the_time_until_the_resolve(
    db: Database,
) -> None:
    task, namespace = one_step_task(db, max_attempts=1)
    step = claim(db, namespace, T0)
    fail(db, step, T0 + timedelta(seconds=2), retryable=False)
    with db.write() as conn:  # an hour later, an operator resolves it
        resolve_step(conn, step.step_uuid, operator="t", now=T0 + timedelta(hours=1))
    with db.read() as conn:
        (summary,) = task_steps(conn, task, now=T0 + timedelta(hours=2))
        (attempt,) = step_view(conn, step.step_uuid).attempts
    assert summary.state == "resolved_manually"
    assert summary.duration_ms == 2000
    assert attempt.duration_ms(T0) == 2000  # the dashboard's step page says the same


def test_a_step_waiting_for_retry_shows_the_attempt_that_failed(db: Database) -> None:
    task, namespace = one_step_task(db, max_attempts=3)
    first = claim(db, namespace, T0)
    fail(db, first, T0 + timedelta(milliseconds=1500), retryable=True)
    with db.read() as conn:
        (summary,) = task_steps(conn, task, now=T0 + timedelta(minutes=5))
    assert summary.state == "waiting_for_retry"
    assert summary.duration_ms == 1500


def test_a_running_attempt_counts_from_its_claim(db: Database) -> None:
    task, namespace = one_step_task(db, max_attempts=1)
    claim(db, namespace, T0)
    with db.read() as conn:
        (summary,) = task_steps(conn, task, now=T0 + timedelta(seconds=7))
    assert (summary.state, summary.duration_ms) == ("in_progress", 7000)


def test_a_timed_out_attempt_lasts_as_long_as_it_ran(sqlite_db: Database) -> None:
    """A real worker times a stuck handler out after 1 s: every view says about 1 s."""
    registry = HandlerRegistry()
    started, unstick = threading.Event(), threading.Event()

    def stuck(ctx: StepContext) -> dict[str, bool]:
        started.set()
        unstick.wait(30)  # ignores ctx.cancelled: a thread nobody can stop
        return {"late": True}

    registry.register("t.stuck", stuck)
    with running_worker(sqlite_db, 1, registry) as (worker, _):
        try:
            task = submit(
                sqlite_db,
                [{"name": "stuck", "handler": "t.stuck", "timeout_ms": 1000, "max_attempts": 1}],
            )
            worker.nudge()
            assert started.wait(10)
            deadline = utcnow() + timedelta(seconds=30)
            while step_row(sqlite_db, task, "stuck").state != "error":
                assert utcnow() < deadline, "the timeout was never committed"
                threading.Event().wait(0.02)
        finally:
            unstick.set()

    row = step_row(sqlite_db, task, "stuck")
    assert row.error["error_type"] == "handler_timeout"
    # The row's started_at is when the handler started, not the moment of the timeout.
    assert (row.completed_at - row.started_at).total_seconds() >= 1.0
    with sqlite_db.read() as conn:
        (summary,) = task_steps(conn, task)
        (attempt,) = step_view(conn, summary.step_uuid).attempts
        timeline = task_view(conn, task, now=utcnow()).timeline
    assert summary.duration_ms is not None
    assert summary.duration_ms >= 1000
    assert attempt.duration_ms(utcnow()) == summary.duration_ms
    (lane,) = timeline.lanes
    assert lane.bars[0].attempt == attempt
    assert summary.as_json()["duration_ms"] == summary.duration_ms
    # `duplex status TASK` prints it as seconds.
    console = make_console()
    with console.capture() as captured:
        console.print(steps_table([summary]))
    (line,) = [text for text in captured.get().splitlines() if text.startswith("stuck")]
    shown = re.search(r"(\d+\.\d) s", line)
    assert shown is not None, line
    assert shown.group(0) == duration(summary.duration_ms)
    assert float(shown.group(1)) >= 1.0
