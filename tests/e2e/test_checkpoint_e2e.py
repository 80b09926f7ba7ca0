"""A worker_lost retry resumes from the last accepted checkpoint, end to end on PostgreSQL: real
``duplex run`` subprocesses, one SIGKILLed while its handler holds a step it checkpointed
(handlers: ``tests/e2e_handlers/checkpoints.py``)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from duplex.clock import utcnow
from duplex.storage.submission import create_task
from duplex.templates import parse_template
from tests.e2e.support import Cluster, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

K = 5
TEMPLATE = f"""
name = "resumable"
[[steps]]
name = "count"
handler = "checkpoints.resumable"
max_attempts = 3
inputs = {{ k = {K} }}
"""


def test_a_worker_lost_retry_resumes_from_the_last_accepted_checkpoint(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    cluster = make_cluster(
        {
            "worker": {
                "handler_modules": ["tests.e2e_handlers.checkpoints"],
                "max_concurrent_handlers": 2,
                "heartbeat_interval_s": 0.2,
            },
            # Short liveness timeout: the replacement recovers the killed worker's claim at
            # once by the same-host rule, and by the heartbeat rule within a second anyway.
            "event_system": {"polling_interval_ms": 50, "claim_timeout_s": 1},
        },
        env={"CHECKPOINTS_DIR": str(markers)},
    )
    first = cluster.start_worker("first")
    cluster.wait_started(first)
    with cluster.db.write() as conn:
        task = create_task(conn, parse_template(TEMPLATE), {}, now=utcnow())

    saved = markers / "saved"

    def checkpointed() -> bool:
        # A handler that cannot checkpoint fails its attempt: say so now, not at the timeout.
        errors = cluster.sql("SELECT error FROM workflow_steps WHERE error IS NOT NULL")
        assert errors == [], errors
        return saved.exists()

    wait_for(checkpointed, "the first attempt to save its checkpoints")
    step_uuid, attempt, pid = saved.read_text().split()
    assert (int(attempt), int(pid)) == (1, first.pid)
    ((checkpoint, state, claimed_by),) = cluster.sql(
        "SELECT checkpoint, state, claimed_by FROM workflow_steps WHERE step_uuid = %s",
        [step_uuid],
    )
    assert (checkpoint, state, claimed_by) == ({"i": K}, "in_progress", first.worker_id)

    os.kill(first.pid, signal.SIGKILL)
    first.popen.wait(timeout=10)
    second = cluster.start_worker("second")
    cluster.wait_started(second)

    def finished() -> bool:
        assert second.alive(), second.stderr()
        ((state,),) = cluster.sql("SELECT state FROM tasks WHERE task_uuid = %s", [task])
        return bool(state == "complete")

    wait_for(finished, "the task to complete on the second worker")
    ((results, checkpoint, attempts),) = cluster.sql(
        "SELECT results, checkpoint, attempts FROM workflow_steps WHERE step_uuid = %s",
        [step_uuid],
    )
    # The second attempt started from the last checkpoint the killed one saved, not from 0.
    assert results == {"started_from": {"i": K}, "attempt": 2, "pid": second.pid}
    assert (checkpoint, attempts) == ({"i": K}, 2)
    settled = cluster.sql(
        "SELECT attempt, to_state, reason, worker_id FROM workflow_step_transitions "
        "WHERE step_uuid = %s AND from_state = 'in_progress' ORDER BY id",
        [step_uuid],
    )
    assert settled == [
        (1, "waiting_for_retry", "worker_lost", first.worker_id),
        (2, "complete", "succeeded", second.worker_id),
    ]
