"""Concurrency keys end to end on SQLite: two ``duplex run`` processes sharing one database
file never run more attempts of a key at once than its limit (hypothesis draws the keys,
limits and handler durations), read from the transition rows in ``id`` order as
``test_concurrency_keys_e2e`` does on PostgreSQL.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from duplex import Client
from duplex.templates import parse_template
from tests import processes
from tests.cli.support import Duplex, make_duplex, wait_for
from tests.conftest import sqlite_database
from tests.e2e.test_concurrency_keys_e2e import (
    HANDLERS,
    Workload,
    keyed_template,
    peaks,
    workloads,
)

pytestmark = [pytest.mark.e2e]


def peak_running(duplex: Duplex) -> dict[str, int]:
    return peaks(
        duplex.sql(
            "SELECT s.concurrency_key, t.step_uuid, t.attempt, t.from_state, t.to_state"
            " FROM workflow_step_transitions t JOIN workflow_steps s"
            " ON s.step_uuid = t.step_uuid WHERE s.concurrency_key IS NOT NULL ORDER BY t.id"
        )
    )


@settings(
    max_examples=3,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(workload=workloads())
def test_two_sqlite_workers_never_run_a_key_over_its_limit(workload: Workload) -> None:
    with tempfile.TemporaryDirectory(prefix="duplex-keys-") as tmp:
        duplex = make_duplex(
            Path(tmp),
            handler_modules=[HANDLERS],
            worker={"max_concurrent_handlers": 4, "shutdown_timeout_ms": 2000},
        )
        db = sqlite_database(duplex.db_path)
        run = uuid.uuid4().hex[:8]
        templates = [
            parse_template(keyed_template(f"keyed_{i}", "keyed.sleep", limit))
            for i, limit in enumerate(workload.limits)
        ]
        owner = processes.current()
        logs = [open(duplex.cwd / f"w{i}.err", "wb") for i in range(2)]  # noqa: SIM115
        workers = [
            owner.popen(duplex.command(["run"]), cwd=duplex.cwd, env=duplex.env, stderr=log)
            for log in logs
        ]
        try:
            with Client(db) as client:
                for key, ms in workload.tasks:
                    client.submit(templates[key], {"customer": f"{run}-c{key}", "ms": ms})

            def all_complete() -> bool:
                for i, worker in enumerate(workers):
                    assert worker.poll() is None, (duplex.cwd / f"w{i}.err").read_text()
                ((done,),) = duplex.sql("SELECT COUNT(*) FROM tasks WHERE state = 'complete'")
                return int(done) == len(workload.tasks)

            wait_for(all_complete, f"the {len(workload.tasks)} tasks to complete", timeout=60)
        finally:
            for worker in workers:
                owner.stop(worker)
            for log in logs:
                log.close()
            db.dispose()
        for i in range(2):
            assert "Traceback" not in (duplex.cwd / f"w{i}.err").read_text()
        assert duplex.sql("SELECT state, attempts FROM workflow_steps GROUP BY 1, 2") == [
            ("complete", 1)
        ]
        peak = peak_running(duplex)
        limits = {f"context.customer={run}-c{i}": limit for i, limit in enumerate(workload.limits)}
        over = {key: (peak[key], limits[key]) for key in peak if peak[key] > limits[key]}
        assert not over, f"keys run over their limit (peak, limit): {over}"
