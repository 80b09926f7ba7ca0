"""Concurrency keys end to end, on PostgreSQL: real ``duplex run`` processes never run more
attempts of one key at once than its limit (docs: a step's ``concurrency = { key, limit }``),
also when a worker holding the key's slots is SIGKILLed.

What ran at once is read from the transition rows: an attempt runs from its claim (the row
``to_state = 'in_progress'``) to the next row of that step and attempt (its result, or its
recovery as ``worker_lost``). The rows are ordered by their ``id`` (a sequence, taken inside
the transaction that writes the row), not by ``created_at`` (each worker's clock, read before
the transaction waits for the key's lock): a claim admitted because an attempt ended counts
the running attempts after that attempt's commit, so its row's id is the larger. Ordered so,
the attempts seen running at once are never more than the claims counted.

Each test builds a ``Cluster`` (``tests/e2e/support.py``, a schema of its own) and stops the
workers it starts in a ``finally``; the handlers are ``tests/e2e_handlers/keyed.py``.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from duplex.clock import utcnow
from duplex.storage.submission import create_task
from duplex.templates import parse_template
from tests import processes
from tests.e2e.support import Cluster, WorkerProcess, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

HANDLERS = "tests.e2e_handlers.keyed"


def keyed_template(name: str, handler: str, limit: int) -> str:
    return "\n".join(
        [
            f'name = "{name}"',
            "[[steps]]",
            'name = "work"',
            f'handler = "{handler}"',
            f'concurrency = {{ key = "context.customer", limit = {limit} }}',
            "",
        ]
    )


def submit_all(
    cluster: Cluster, templates: dict[str, str], contexts: Sequence[tuple[str, dict[str, object]]]
) -> list[str]:
    """Submit a task per (template name, context), all in one transaction."""
    parsed = {name: parse_template(text) for name, text in templates.items()}
    with cluster.db.write() as conn:
        return [
            create_task(conn, parsed[name], dict(context), now=utcnow())
            for name, context in contexts
        ]


def peak_running(cluster: Cluster, tasks: Sequence[str]) -> dict[str, int]:
    """Per concurrency key of the tasks' steps: the most attempts running at once.

    An attempt runs from its claim to the next move of that step and attempt out of
    ``in_progress``; the rows are taken in ``id`` order (the module's docstring says why).
    An attempt never settled runs to the end.
    """
    rows = cluster.sql(
        "SELECT s.concurrency_key, t.step_uuid, t.attempt, t.from_state, t.to_state "
        "FROM workflow_step_transitions t JOIN workflow_steps s ON s.step_uuid = t.step_uuid "
        "WHERE s.task_uuid = ANY(%s) AND s.concurrency_key IS NOT NULL ORDER BY t.id",
        [list(tasks)],
    )
    return peaks(rows)


def peaks(rows: Sequence[Sequence[Any]]) -> dict[str, int]:
    """The most attempts running at once per key, from transition rows in ``id`` order:
    (concurrency key, step uuid, attempt, from state, to state) each."""
    running: dict[str, set[tuple[str, int]]] = defaultdict(set)
    peak: dict[str, int] = defaultdict(int)
    for key, step_uuid, attempt, from_state, to_state in rows:
        if from_state == "in_progress":
            assert (step_uuid, attempt) in running[key], ("settled, never claimed", step_uuid)
            running[key].discard((step_uuid, attempt))
        if to_state == "in_progress":
            assert (step_uuid, attempt) not in running[key], ("claimed twice", step_uuid)
            running[key].add((step_uuid, attempt))
            peak[key] = max(peak[key], len(running[key]))
    return dict(peak)


def stop(workers: Sequence[WorkerProcess]) -> None:
    """Stop the workers now (SIGTERM, then SIGKILL), whatever state they are in."""
    for worker in workers:
        processes.current().stop(worker.popen)


# --- 1. three workers, random keys and limits ------------------------------------------------


@dataclass(frozen=True)
class Workload:
    limits: tuple[int, ...]  # the limit of key i
    tasks: tuple[tuple[int, int], ...]  # (key index, handler sleep in ms) per task


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    limits = draw(st.lists(st.integers(1, 3), min_size=2, max_size=5))
    n = draw(st.integers(20, 40))
    task = st.tuples(st.integers(0, len(limits) - 1), st.integers(0, 50))
    tasks = draw(st.lists(task, min_size=n, max_size=n))
    return Workload(tuple(limits), tuple(tasks))


# No shrinking: an example costs three worker starts (~5 s), and a failing one says enough.
@settings(
    max_examples=3,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(workload=workloads())
def test_three_postgres_workers_never_run_a_key_over_its_limit(
    make_cluster: Callable[..., Cluster], workload: Workload
) -> None:
    # A schema and three workers per example: nothing of one example is seen by the next.
    cluster = make_cluster(
        {
            "worker": {
                "handler_modules": [HANDLERS],
                "max_concurrent_handlers": 4,
                "shutdown_timeout_ms": 2000,
            },
            "event_system": {"polling_interval_ms": 20},
        }
    )
    run = uuid.uuid4().hex[:8]
    templates = {
        f"keyed_{i}": keyed_template(f"keyed_{i}", "keyed.sleep", limit)
        for i, limit in enumerate(workload.limits)
    }
    contexts = [
        (f"keyed_{key}", {"customer": f"{run}-c{key}", "ms": ms}) for key, ms in workload.tasks
    ]
    workers = [cluster.start_worker(f"w{i}") for i in range(3)]
    try:
        cluster.wait_started(*workers)
        started = time.monotonic()
        tasks = submit_all(cluster, templates, contexts)

        def all_complete() -> bool:
            for worker in workers:
                assert worker.alive(), f"{worker.name} died:\n{worker.stderr()}"
            ((done,),) = cluster.sql(
                "SELECT COUNT(*) FROM tasks WHERE task_uuid = ANY(%s) AND state = 'complete'",
                [tasks],
            )
            return int(done) == len(tasks)

        wait_for(all_complete, f"the {len(tasks)} tasks to complete", timeout=30)
        took_s = time.monotonic() - started
    finally:
        stop(workers)
    for worker in workers:
        assert "Traceback" not in worker.stderr(), worker.stderr()

    rows = cluster.sql(
        "SELECT state, attempts FROM workflow_steps WHERE task_uuid = ANY(%s)", [tasks]
    )
    assert sorted(rows) == [("complete", 1)] * len(tasks)
    peak = peak_running(cluster, tasks)
    limits = {f"context.customer={run}-c{i}": limit for i, limit in enumerate(workload.limits)}
    used = {key for key, _ in workload.tasks}
    assert set(peak) == {f"context.customer={run}-c{i}" for i in used}
    claimed_by = cluster.sql(
        "SELECT DISTINCT t.worker_id FROM workflow_step_transitions t "
        "JOIN workflow_steps s ON s.step_uuid = t.step_uuid "
        "WHERE s.task_uuid = ANY(%s) AND t.to_state = 'in_progress'",
        [tasks],
    )
    print(
        f"\n[keys] {len(tasks)} tasks on {len(claimed_by)} worker(s) in {took_s:.2f}s; "
        + ", ".join(
            f"{key.rsplit('-', 1)[1]}: peak {peak[key]} / limit {limits[key]}"
            for key in sorted(peak)
        )
    )
    over = {key: (peak[key], limits[key]) for key in peak if peak[key] > limits[key]}
    assert not over, f"keys run over their limit (peak, limit): {over}"


# --- 2. a worker holding the key's slots is killed -------------------------------------------

CLAIM_TIMEOUT_S = 2.0
LIMIT = 2


def test_a_killed_worker_frees_its_key_slots_and_nothing_runs_over_the_limit(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(
        {
            "worker": {
                "handler_modules": [HANDLERS],
                "max_concurrent_handlers": 4,
                "heartbeat_interval_s": CLAIM_TIMEOUT_S / 4,
                "shutdown_timeout_ms": 2000,
            },
            "event_system": {"polling_interval_ms": 20, "claim_timeout_s": CLAIM_TIMEOUT_S},
        }
    )
    release = cluster.directory / "release"
    cluster.env["KEYED_RELEASE"] = str(release)
    templates = {"blocking": keyed_template("blocking", "keyed.block", LIMIT)}
    key = "context.customer=c1"
    a = cluster.start_worker("a")
    started = [a]
    try:
        cluster.wait_started(a)
        # Four tasks of the key, room for four handlers: a takes two, the key holds two back.
        tasks = submit_all(cluster, templates, [("blocking", {"customer": "c1"})] * 4)

        def states() -> list[tuple[str, str | None]]:
            return sorted(
                cluster.sql(
                    "SELECT state, claimed_by FROM workflow_steps WHERE concurrency_key = %s",
                    [key],
                )
            )

        def a_holds_both_slots() -> bool:
            assert a.alive(), a.stderr()
            return [state for state, _ in states()] == [
                "in_progress",
                "in_progress",
                "waiting",
                "waiting",
            ]

        wait_for(a_holds_both_slots, "worker a to run two attempts and the key to hold two")
        held_by_a = cluster.claims_of(a)
        assert len(held_by_a) == LIMIT, held_by_a
        b = cluster.start_worker("b")
        started.append(b)
        cluster.wait_started(b)
        time.sleep(0.5)  # b polls ~25 times meanwhile: it must take nothing of the full key
        assert cluster.claims_of(b) == []
        assert a_holds_both_slots()

        killed_at = datetime.now(UTC)
        killed_mono = time.monotonic()
        os.kill(a.pid, signal.SIGKILL)
        a.popen.wait(timeout=10)

        def b_runs_the_key() -> bool:
            assert b.alive(), b.stderr()
            return len(cluster.claims_of(b)) == LIMIT

        wait_for(b_runs_the_key, "worker b to run two attempts of the key", timeout=15)
        seen_s = time.monotonic() - killed_mono
        ((first_on_b,),) = cluster.sql(
            "SELECT MIN(created_at) FROM workflow_step_transitions "
            "WHERE to_state = 'in_progress' AND worker_id = %s",
            [b.worker_id],
        )
        taken_s = (first_on_b - killed_at).total_seconds()
        print(
            f"\n[killed] worker b took the key's first slot {taken_s:.3f}s after the SIGKILL, "
            f"both seen after {seen_s:.3f}s (liveness timeout {CLAIM_TIMEOUT_S:g}s)"
        )
        assert taken_s < CLAIM_TIMEOUT_S + 5.0
        # Still full: the other two steps wait, b takes no third attempt of the key.
        time.sleep(0.5)
        assert len(cluster.claims_of(b)) == LIMIT
        assert peak_running(cluster, tasks) == {key: LIMIT}

        release.touch()

        def all_complete() -> bool:
            assert b.alive(), b.stderr()
            ((done,),) = cluster.sql(
                "SELECT COUNT(*) FROM tasks WHERE task_uuid = ANY(%s) AND state = 'complete'",
                [tasks],
            )
            return int(done) == len(tasks)

        wait_for(all_complete, "the four tasks to complete on worker b", timeout=20)
        assert b.terminate() == 0, b.stderr()
    finally:
        release.touch()
        stop(started)
    assert "Traceback" not in b.stderr(), b.stderr()

    # The killed worker's two attempts were recovered, once each, and ran until then.
    lost = cluster.sql(
        "SELECT step_uuid, attempt FROM workflow_step_transitions "
        "WHERE from_state = 'in_progress' AND reason = 'worker_lost' AND worker_id = %s",
        [a.worker_id],
    )
    assert sorted(lost) == sorted(held_by_a)
    rows = cluster.sql(
        "SELECT step_uuid, state, attempts FROM workflow_steps WHERE task_uuid = ANY(%s)", [tasks]
    )
    for step_uuid, state, attempts in rows:
        assert state == "complete", step_uuid
        assert attempts == (2 if (step_uuid, 1) in held_by_a else 1), step_uuid
    assert peak_running(cluster, tasks) == {key: LIMIT}
