"""``duplex cancel TASK`` reaches a running attempt on another worker, end to end on PostgreSQL:
two ``duplex run`` subprocesses; the handler (``tests/e2e_handlers/cancels.py``) runs on one of
them and waits for ``ctx.cancelled``. The cancel is committed by this test process, which no
worker hears from: the worker running the step finds it at its sweep."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from duplex.clock import utcnow
from duplex.storage.operations import cancel_task
from duplex.storage.submission import create_task
from duplex.templates import parse_template
from tests.e2e.support import Cluster, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

SWEEP_MS = 200
# One sweep interval, plus the margin of a busy test machine.
BOUND_S = SWEEP_MS / 1000 + 1.0

TEMPLATE = """
name = "cancellable"
[[steps]]
name = "hold"
handler = "cancels.until_cancelled"
timeout_ms = 120000
[[steps]]
name = "next"
handler = "cancels.until_cancelled"
depends_on = ["hold"]
"""


def test_cancel_reaches_a_running_handler_on_another_worker_within_the_sweep(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    cluster = make_cluster(
        {
            "worker": {
                "handler_modules": ["tests.e2e_handlers.cancels"],
                "deadline_sweep_interval_ms": SWEEP_MS,
            },
            "event_system": {"polling_interval_ms": 50},
        },
        env={"CANCELS_DIR": str(markers)},
    )
    workers = [cluster.start_worker("a"), cluster.start_worker("b")]
    cluster.wait_started(*workers)
    with cluster.db.write() as conn:
        task = create_task(conn, parse_template(TEMPLATE), {}, now=utcnow())

    started = markers / "started"
    wait_for(started.exists, "the handler to start on one of the workers")
    step_uuid, pid = started.read_text().split()
    (running,) = [w for w in workers if w.pid == int(pid)]
    (idle,) = [w for w in workers if w is not running]

    with cluster.db.write() as conn:
        report = cancel_task(conn, task, operator="operator:e2e", now=utcnow())
    cancelled_at = time.time()
    assert report.still_running == 1

    seen = markers / "seen"
    wait_for(seen.exists, "the handler to see ctx.cancelled", timeout=10)
    seen_at, seen_pid = seen.read_text().split()
    assert int(seen_pid) == running.pid
    assert float(seen_at) - cancelled_at <= BOUND_S, float(seen_at) - cancelled_at

    def settled() -> bool:
        rows = cluster.sql("SELECT state FROM workflow_steps WHERE task_uuid = %s", [task])
        return all(state in ("cancelled", "complete", "error") for (state,) in rows)

    wait_for(settled, "every step of the task to be terminal")
    rows = cluster.sql(
        "SELECT name, state, error->>'error_type', results, claimed_by FROM workflow_steps "
        "WHERE task_uuid = %s ORDER BY position",
        [task],
    )
    assert rows == [
        ("hold", "cancelled", "cancelled", None, running.worker_id),
        ("next", "cancelled", None, None, None),
    ]
    assert cluster.sql("SELECT state FROM tasks WHERE task_uuid = %s", [task]) == [("cancelled",)]
    (moved,) = cluster.sql(
        "SELECT worker_id FROM workflow_step_transitions "
        "WHERE step_uuid = %s AND from_state = 'in_progress'",
        [step_uuid],
    )
    # The worker that ran it cancelled it; the other one never held it.
    assert moved == (running.worker_id,)
    assert idle.worker_id not in {
        worker_id
        for (worker_id,) in cluster.sql(
            "SELECT worker_id FROM workflow_step_transitions WHERE step_uuid = %s", [step_uuid]
        )
    }
    assert running.alive()
    assert idle.alive()
