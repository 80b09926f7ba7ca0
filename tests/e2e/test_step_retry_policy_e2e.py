"""A step's own retry policy, end to end: a real worker (its actors on a SQLite file) retries a
failing step with ``strategy = "fixed"``, ``base_ms = 200`` although the worker's ``[retry]``
waits 10 ms; the gaps are read from the transition rows.

The lower bound is exact: a retry is claimable only once ``next_attempt_at`` (the failure's
commit time + 200 ms, by the same clock that stamps the transitions) has passed. The upper
bound is generous (a loaded machine polls late), and it is not what this test is about.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from duplex.clock import utcnow
from duplex.handlers import HandlerRegistry, StepContext
from duplex.storage.db import Database
from duplex.storage.models import workflow_step_transitions as wst
from duplex.storage.submission import create_task
from duplex.templates import parse_template
from tests.actors.support import running_worker, step_row
from tests.conftest import sqlite_database

pytestmark = pytest.mark.e2e

ATTEMPTS = 4
WAIT_S = 30.0

TEMPLATE = f"""
name = "flaky_charge"
[[steps]]
name = "charge"
handler = "e2e.always_fails"
max_attempts = {ATTEMPTS}
[steps.retry]
strategy = "fixed"
base_ms = 200
jitter = 0.0
"""


def test_a_failing_step_is_retried_on_its_own_fixed_schedule(tmp_path: Path) -> None:
    db = sqlite_database(tmp_path / "retry.db")
    calls: list[int] = []
    done = threading.Event()

    def always_fails(ctx: StepContext) -> None:
        calls.append(ctx.attempt)
        if ctx.attempt == ATTEMPTS:
            done.set()
        raise RuntimeError(f"declined (attempt {ctx.attempt})")

    registry = HandlerRegistry()
    registry.register("e2e.always_fails", always_fails)
    try:
        with running_worker(db, 2, registry):
            with db.write() as conn:
                task = create_task(conn, parse_template(TEMPLATE), {}, now=utcnow())
            assert done.wait(WAIT_S), f"only attempts {calls} ran"
            _wait_for_error(db, task)
        gaps = retry_gaps(db, task)
    finally:
        db.dispose()
    assert calls == list(range(1, ATTEMPTS + 1))
    assert len(gaps) == ATTEMPTS - 1
    for gap in gaps:
        # The worker's own [retry] (10 ms, tests.actors.support) would allow much less.
        assert gap >= timedelta(milliseconds=200), gaps
        assert gap < timedelta(seconds=10), gaps


def retry_gaps(db: Database, task: str) -> list[timedelta]:
    """From each ``in_progress -> waiting_for_retry`` row to the claim that follows it."""
    with db.read() as conn:
        step_uuid = step_row(db, task, "charge").step_uuid
        rows = conn.execute(
            select(wst.c.from_state, wst.c.to_state, wst.c.created_at)
            .where(wst.c.step_uuid == step_uuid)
            .order_by(wst.c.id)
        ).all()
    gaps = []
    failed_at = None
    for from_state, to_state, at in rows:
        if to_state == "waiting_for_retry":
            failed_at = at
        elif from_state == "waiting_for_retry" and to_state == "in_progress":
            assert failed_at is not None
            gaps.append(at - failed_at)
            failed_at = None
    return gaps


def _wait_for_error(db: Database, task: str) -> None:
    event = threading.Event()
    for _ in range(int(WAIT_S / 0.05)):
        if step_row(db, task, "charge").state == "error":
            return
        event.wait(0.05)
    raise AssertionError("the last attempt's failure was not committed")
