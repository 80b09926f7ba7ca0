"""Two ``duplex run`` processes on PostgreSQL fire a schedule every second for 20 s: one task
per second, none twice; ``duplex schedule pause`` stops the fires, ``resume`` brings them back."""

from __future__ import annotations

import itertools
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from tests import processes
from tests.e2e.support import Cluster, Step, template_toml, wait_for

RUN_S = 20


def cli(cluster: Cluster, *args: str) -> str:
    result = processes.run(
        [sys.executable, "-m", "duplex", *args],
        cwd=cluster.directory,
        env=cluster.env,
        timeout=60,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return str(result.stdout)


def fires(cluster: Cluster) -> list[tuple[Any, ...]]:
    return cluster.sql(
        "SELECT fire_at, outcome, task_uuid, worker_id FROM schedule_fires "
        "WHERE schedule_name = 'each-second' ORDER BY fire_at"
    )


def test_two_workers_fire_once_per_second_and_obey_pause_and_resume(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(
        {
            "event_system": {"polling_interval_ms": 100},
            "schedules": {"poll_interval_ms": 100},
        }
    )
    templates = cluster.directory / "templates"
    templates.mkdir()
    (templates / "tick.toml").write_text(template_toml("tick", [Step("work", ms=20)]))
    workers = [cluster.start_worker("a"), cluster.start_worker("b")]
    cluster.wait_started(*workers)

    cli(cluster, "schedule", "add", "each-second", "tick", "--every", "1s", "--overlap", "allow")
    time.sleep(RUN_S)  # the real time the schedule is about
    out = cli(cluster, "schedule", "pause", "each-second")
    assert "paused" in out
    at_pause = fires(cluster)
    time.sleep(3)
    assert fires(cluster) == at_pause, "a paused schedule fired"

    # One task per second, consecutive, none twice, every one with its key.
    times = [row[0] for row in at_pause]
    assert len(times) >= RUN_S - 2, times
    assert all(row[1] == "fired" for row in at_pause)
    assert [b - a for a, b in itertools.pairwise(times)] == [timedelta(seconds=1)] * (
        len(times) - 1
    )
    keys = Counter(
        key
        for (key,) in cluster.sql(
            "SELECT idempotency_key FROM tasks WHERE idempotency_key LIKE 'schedule:each-second@%%'"
        )
    )
    assert len(keys) == len(times)
    assert set(keys.values()) == {1}
    (events,) = cluster.sql("SELECT COUNT(*) FROM domain_events WHERE name = 'schedule.fired'")
    assert events[0] == len(times)
    assert {row[3] for row in at_pause} <= {w.worker_id for w in workers}

    cli(cluster, "schedule", "resume", "each-second")
    wait_for(lambda: len(fires(cluster)) >= len(at_pause) + 2, "fires after the resume")
    resumed = fires(cluster)[len(at_pause) :]
    assert resumed[0][0] > times[-1] + timedelta(seconds=3)  # the paused seconds were not fired
    wait_for(lambda: cluster.open_work() == 0, "the fired tasks to finish")
    (states,) = cluster.sql(
        "SELECT COUNT(*) FROM tasks "
        "WHERE state <> 'complete' AND idempotency_key LIKE 'schedule:%%'"
    )
    assert states[0] == 0
    for worker in workers:
        assert worker.terminate() == 0, worker.stderr()
