"""A running worker's timed sweep ends a sleep, and the step after it runs: the wait sweep is
part of the watchdog's round (``CompletionProcessor.sweep_deadlines``). The round is called
here by hand, once the sleep's end has passed, rather than waited for."""

from __future__ import annotations

from pathlib import Path

from duplex import Client
from duplex.clock import utcnow
from duplex.handlers import HandlerRegistry
from duplex.templates import parse_template
from tests.actors.support import running_worker, step_row
from tests.conftest import sqlite_database, wait_until

NAP = """
name = "nap"
[[steps]]
name = "nap"
kind = "sleep"
duration = "1ms"
[[steps]]
name = "after"
handler = "nap.after"
depends_on = ["nap"]
"""
WAIT_S = 30.0


def test_the_watchdog_round_ends_a_sleep_and_the_step_after_it_runs(tmp_path: Path) -> None:
    db = sqlite_database(tmp_path / "nap.db")
    registry = HandlerRegistry()
    registry.register("nap.after", lambda ctx: {"slept": ctx.dependency_results["nap"]})
    # No timed sweep of its own during the test: only the one called below ends the sleep.
    hour = {"deadline_sweep_interval_ms": 3_600_000}
    try:
        with running_worker(db, 1, registry, worker_settings=hour) as (worker, _):
            with Client(db) as client:
                task = client.submit(parse_template(NAP), {})
            ends_at = step_row(db, task, "nap").next_attempt_at
            assert step_row(db, task, "nap").state == "waiting"
            assert wait_until(lambda: utcnow() > ends_at, WAIT_S)
            assert worker.actors is not None
            assert worker.actors.completion.sweep_deadlines().get(timeout=WAIT_S) == 0
            assert wait_until(lambda: step_row(db, task, "after").state == "complete", WAIT_S)
        assert step_row(db, task, "nap").results == {}
        assert step_row(db, task, "after").results == {"slept": {}}
    finally:
        db.dispose()
