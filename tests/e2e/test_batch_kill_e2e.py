"""A worker SIGKILLed while a batch step's result commits, on PostgreSQL: after recovery the
batch's items all exist or none do, never a part (docs/workflows.md, Batches).

The moment is made, not waited for: the test locks ``workflow_step_edges`` against writes, so
the commit that creates the items stops inside its transaction, after the item rows and
before their edges (``pg_stat_activity`` shows its backend waiting on that lock). The worker
is killed there; the lock is released, the orphaned transaction goes on until it finds its
client gone and rolls back. A second worker recovers the batch step (``worker_lost``), runs it
again, and every item runs once; the convergence reads all of them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import psycopg
import pytest

from duplex.clock import utcnow
from duplex.storage.submission import create_task
from duplex.templates import parse_template
from tests.e2e.support import Cluster, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

ITEMS = 3000
TEMPLATE = f"""
name = "batch_kill"
[[steps]]
name = "split"
kind = "batch"
handler = "batches.split"
worker = "item"
inputs = {{ n = {ITEMS} }}
[[steps]]
name = "item"
handler = "batches.item"
depends_on = ["split"]
[[steps]]
name = "total"
handler = "batches.total"
depends_on = ["item"]
"""


def test_a_batch_killed_while_it_commits_creates_all_its_items_or_none(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(
        {
            "worker": {
                "handler_modules": ["tests.e2e_handlers.batches"],
                "max_concurrent_handlers": 4,
                "heartbeat_interval_s": 0.2,
            },
            "event_system": {"polling_interval_ms": 50, "claim_timeout_s": 1},
        }
    )
    with cluster.db.write() as conn:
        task = create_task(conn, parse_template(TEMPLATE), {}, now=utcnow())

    def items() -> int:
        ((count,),) = cluster.sql(
            "SELECT COUNT(*) FROM workflow_steps WHERE task_uuid = %s AND item_index IS NOT NULL",
            [task],
        )
        return int(count)

    # Hold writes to the edges: the batch's commit stops after writing its item rows.
    blocker = psycopg.connect(cluster.conninfo("duplex-batch-blocker"))
    try:
        blocker.execute("LOCK TABLE workflow_step_edges IN SHARE ROW EXCLUSIVE MODE")
        first = cluster.start_worker("first")
        cluster.wait_started(first)

        def commit_blocked() -> list[tuple[int]]:
            assert first.alive(), first.stderr()
            return cluster.sql(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                "AND wait_event_type = 'Lock' AND query LIKE '%%workflow_step_edges%%'",
                [cluster.app_name],
            )

        wait_for(lambda: bool(commit_blocked()), "the batch's commit to wait for the edges")
        ((backend,),) = commit_blocked()
        os.kill(first.pid, signal.SIGKILL)
        first.popen.wait(timeout=10)
        assert items() == 0  # written but not committed: nobody sees them
    finally:
        blocker.rollback()
        blocker.close()

    def backend_gone() -> bool:
        return not cluster.sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [backend])

    wait_for(backend_gone, "the killed worker's transaction to end")
    assert items() == 0
    ((state, attempts),) = cluster.sql(
        "SELECT state, attempts FROM workflow_steps WHERE task_uuid = %s AND name = 'split'",
        [task],
    )
    assert (state, attempts) == ("in_progress", 1)

    second = cluster.start_worker("second")
    cluster.wait_started(second)
    seen: set[int] = set()

    def finished() -> bool:
        assert second.alive(), second.stderr()
        seen.add(items())
        ((task_state,),) = cluster.sql("SELECT state FROM tasks WHERE task_uuid = %s", [task])
        return bool(task_state == "complete")

    wait_for(finished, "the task to complete on the second worker", timeout=120)
    assert seen <= {0, ITEMS}  # every look saw all of the items or none
    assert items() == ITEMS
    # Each item ran exactly once, and the convergence read every result, in order.
    ran = cluster.sql(
        "SELECT s.item_index, COUNT(*) FROM workflow_step_transitions t "
        "JOIN workflow_steps s ON s.step_uuid = t.step_uuid "
        "WHERE s.task_uuid = %s AND s.item_index IS NOT NULL AND t.to_state = 'complete' "
        "GROUP BY s.item_index",
        [task],
    )
    assert sorted(ran) == [(i, 1) for i in range(ITEMS)]
    ((total,),) = cluster.sql(
        "SELECT results FROM workflow_steps WHERE task_uuid = %s AND name = 'total'", [task]
    )
    assert total == {"count": ITEMS, "sum": ITEMS * (ITEMS - 1) // 2}
    settled = cluster.sql(
        "SELECT t.attempt, t.to_state, t.reason FROM workflow_step_transitions t "
        "JOIN workflow_steps s ON s.step_uuid = t.step_uuid "
        "WHERE s.task_uuid = %s AND s.name = 'split' AND t.from_state = 'in_progress' "
        "ORDER BY t.id",
        [task],
    )
    assert settled == [(1, "waiting_for_retry", "worker_lost"), (2, "complete", "succeeded")]
