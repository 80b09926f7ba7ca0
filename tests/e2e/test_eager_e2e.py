"""Eager dispatch with two ``duplex run`` workers on PostgreSQL: both share the work, the
commits' claims stay with the worker whose result made the step ready, and nothing runs twice.

The work runs in rounds made by the test, never by timing: the held steps (``rounds.gated``,
``tests/e2e_handlers/rounds.py``) wait until the test releases them. A round ends when every
worker holds what it can (all its slots, or nothing more to claim); the test then reads who
holds what and releases exactly those. With no prefetch, a worker runs at most its slots at
once, so in a round where both are full each holds exactly its slots: that is what makes the
shares below certain rather than likely.

The workers, the schema and the run log come from the PostgreSQL fault tests' cluster
(``tests/e2e/test_postgres_faults.py``); the processes are stopped at teardown.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_postgres
from tests.e2e.support import (
    Cluster,
    Step,
    WorkerProcess,
    assert_each_attempt_ran_at_most_once,
    assert_each_attempt_settled_once,
    wait_for,
)

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

SLOTS = 4
ROUND_S = 60.0

# The fault tests' fixture, under this module's name for it: clusters of workers in schemas
# of their own, every process killed and every schema dropped afterwards.


@pytest.fixture
def released(tmp_path: Path) -> Path:
    path = tmp_path / "released"
    path.mkdir()
    return path


def two_workers(
    make_cluster: Callable[..., Cluster], released: Path, **worker: Any
) -> tuple[Cluster, list[WorkerProcess]]:
    require_postgres()
    cluster = make_cluster(
        {
            "worker": {
                "max_concurrent_handlers": SLOTS,
                "prefetch": 0,
                "handler_modules": ["tests.e2e_handlers.kills", "tests.e2e_handlers.rounds"],
                "handler_timeout_ms": 300_000,
                **worker,
            },
            "event_system": {"deployment_mode": "hybrid", "polling_interval_ms": 100},
        },
        env={"ROUNDS_DIR": str(released)},
    )
    workers = [cluster.start_worker("a"), cluster.start_worker("b")]
    cluster.wait_started(*workers)
    return cluster, workers


def run_in_rounds(
    cluster: Cluster, workers: list[WorkerProcess], gated: set[str], released: Path
) -> list[dict[str, int]]:
    """Release the gated steps round by round; return, per round, how many each worker held
    (by worker id)."""
    rounds: list[dict[str, int]] = []
    done: set[str] = set()
    by_pid = {w.pid: w.worker_id for w in workers}
    while done != gated:
        holding: dict[str, set[str]] = {}

        def round_ended(done: set[str] = done, holding: dict[str, set[str]] = holding) -> bool:
            """Every worker is full, or has nothing in flight and nothing left to claim."""
            held: dict[str, set[str]] = defaultdict(set)
            for step_uuid, _, pid in cluster.runs():
                if step_uuid in gated and step_uuid not in done:
                    held[by_pid[pid]].add(step_uuid)
            with cluster.snapshot():
                claimed = dict(
                    cluster.sql(
                        "SELECT claimed_by, COUNT(*) FROM workflow_steps"
                        " WHERE state = 'in_progress' GROUP BY claimed_by"
                    )
                )
                (queued,) = cluster.sql(
                    "SELECT COUNT(*) FROM workflow_steps WHERE state = 'enqueued'"
                )[0]
            for worker in workers:
                mine = len(held[worker.worker_id])
                # Guarantee 1: a worker never runs more than its slots at once.
                assert mine <= SLOTS, (worker.name, mine)
                if mine < SLOTS and (claimed.get(worker.worker_id, 0) != mine or queued):
                    return False
            holding.update(held)
            return bool(held)

        wait_for(round_ended, f"round {len(rounds) + 1} to fill", timeout=ROUND_S)
        rounds.append({worker: len(steps) for worker, steps in holding.items()})
        for steps in holding.values():
            for step_uuid in steps:
                (released / step_uuid).touch()
            done |= steps
    return rounds


def moves(cluster: Cluster) -> list[tuple[str, str | None, str, int, str | None, datetime]]:
    return cluster.sql(
        "SELECT step_uuid, from_state, to_state, attempt, worker_id, created_at"
        " FROM workflow_step_transitions ORDER BY id"
    )


def eager_claims(cluster: Cluster) -> list[tuple[str, str, str]]:
    """(step, claimant, the worker that completed the parent) of every claim made in the
    transaction that completed one of the step's parents: same worker clock, same instant."""
    completed: dict[str, tuple[datetime, str]] = {}
    claims: list[tuple[str, str, datetime]] = []
    for step_uuid, from_state, to_state, _, worker_id, at in moves(cluster):
        if to_state == "complete":
            completed[step_uuid] = (at, worker_id or "")
        elif from_state == "enqueued" and to_state == "in_progress":
            claims.append((step_uuid, worker_id or "", at))
    parents: dict[str, list[str]] = defaultdict(list)
    for parent, child in cluster.sql(
        "SELECT from_step_uuid, to_step_uuid FROM workflow_step_edges"
    ):
        parents[child].append(parent)
    found = []
    for step_uuid, claimant, at in claims:
        for parent in parents[step_uuid]:
            if completed.get(parent, (None, ""))[0] == at:
                found.append((step_uuid, claimant, completed[parent][1]))
                break
    return found


def claims_by_worker(cluster: Cluster, steps: set[str]) -> Counter[str]:
    return Counter(
        worker_id or ""
        for step_uuid, _, to_state, _, worker_id, _ in moves(cluster)
        if to_state == "in_progress" and step_uuid in steps
    )


def finish(cluster: Cluster, workers: list[WorkerProcess], task: str) -> None:
    wait_for(lambda: cluster.open_work() == 0, "the task to finish", timeout=ROUND_S)
    (state,) = cluster.sql("SELECT state FROM tasks WHERE task_uuid = %s", [task])[0]
    assert state == "complete"
    assert cluster.sql("SELECT DISTINCT state, attempts FROM workflow_steps") == [("complete", 1)]
    assert_each_attempt_settled_once(cluster)
    assert_each_attempt_ran_at_most_once(cluster)
    for worker in workers:
        assert worker.terminate() == 0, worker.stderr()


def test_a_wide_fan_out_is_shared_half_and_half(
    make_cluster: Callable[..., Cluster], released: Path
) -> None:
    """root -> 200 middles -> join. The root's commit claims one middle for its worker; the
    queue holds the others for both. Every round both workers are full, so each runs exactly
    half of the middles."""
    middles = [f"m{i:03d}" for i in range(200)]
    cluster, workers = two_workers(make_cluster, released)
    task = cluster.submit(
        "wide",
        [
            Step("root", ms=0),
            *(Step(name, ms=0, depends_on=("root",), handler="rounds.gated") for name in middles),
            Step("join", ms=0, depends_on=tuple(middles)),
        ],
    )
    uuid_of = dict(cluster.sql("SELECT name, step_uuid FROM workflow_steps"))
    gated = {uuid_of[name] for name in middles}

    rounds = run_in_rounds(cluster, workers, gated, released)
    finish(cluster, workers, task)

    ids = sorted(w.worker_id for w in workers)
    assert rounds == [dict.fromkeys(ids, SLOTS)] * (len(middles) // (2 * SLOTS))
    assert claims_by_worker(cluster, gated) == dict.fromkeys(ids, len(middles) // 2)
    # Two claims were made by commits: a middle by the root's worker, the join by the
    # worker whose commit completed the last middles. Each by the worker that made it ready.
    eager = eager_claims(cluster)
    assert len(eager) == 2
    assert {step for step, _, _ in eager} - gated == {uuid_of["join"]}
    assert all(claimant == parent_worker for _, claimant, parent_worker in eager)


def test_chains_stay_with_the_worker_that_claimed_their_first_step(
    make_cluster: Callable[..., Cluster], released: Path
) -> None:
    """50 chains of 5. Each hop is claimed by the commit of the one before, by the same
    worker: a chain never leaves the worker that took its first step from the queue. The
    first steps are held in rounds; in the first rounds both workers are full, so each takes
    at least its slots' worth of chains per round."""
    chains, length = 50, 5
    # Batches of at most SLOTS results: a commit never has more dependents ready than its
    # limit (max_concurrent_handlers), so every hop is claimed by the commit before it.
    cluster, workers = two_workers(make_cluster, released, commit_batch_size=SLOTS)
    steps = []
    for c in range(chains):
        steps.append(Step(f"c{c:02d}_0", ms=0, handler="rounds.gated"))
        steps += [
            Step(f"c{c:02d}_{i}", ms=0, depends_on=(f"c{c:02d}_{i - 1}",)) for i in range(1, length)
        ]
    task = cluster.submit("chains", steps)
    uuid_of = dict(cluster.sql("SELECT name, step_uuid FROM workflow_steps"))
    firsts = {uuid_of[f"c{c:02d}_0"] for c in range(chains)}

    rounds = run_in_rounds(cluster, workers, firsts, released)
    finish(cluster, workers, task)

    claimant = {
        step_uuid: worker_id
        for step_uuid, _, to_state, _, worker_id, _ in moves(cluster)
        if to_state == "in_progress"
    }
    for c in range(chains):
        owners = {claimant[uuid_of[f"c{c:02d}_{i}"]] for i in range(length)}
        assert len(owners) == 1, (c, owners)
    eager = eager_claims(cluster)
    assert len(eager) == chains * (length - 1)
    assert all(claimant == parent_worker for _, claimant, parent_worker in eager)
    # Both workers full in a round: each held exactly its slots. A worker may claim first
    # steps beyond its slots only on credits of hops whose commit it had not heard of yet,
    # at most one per slot per round, so the queue cannot run dry before the third round.
    ids = sorted(w.worker_id for w in workers)
    full = [r for r in rounds if r == dict.fromkeys(ids, SLOTS)]
    assert rounds[: len(full)] == full
    assert len(full) >= 3, rounds
    shares = claims_by_worker(cluster, firsts)
    assert all(shares[worker_id] >= SLOTS * len(full) for worker_id in ids), shares
    steps_run = claims_by_worker(cluster, set(claimant))
    assert sum(steps_run.values()) == chains * length
