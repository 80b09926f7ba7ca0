"""PostgreSQL fault injection, end to end: workers are real ``duplex run`` subprocesses.

Each test gets a schema of its own and a working directory with a ``settings.toml`` (a
``Cluster``, ``tests/e2e/support.py``); the handlers (``tests/e2e_handlers/kills.py``) append
``<step_uuid> <attempt> <pid>`` to a run log as they start. Faults: SIGKILL of one of two
workers (guarantees 3 and 9, same-host "process gone" rule), SIGSTOP past the liveness timeout
(heartbeat rule, late results rejected), CPU-bound handlers that saturate the GIL (a busy worker
never looks dead), and PostgreSQL backends terminated during claims, commits and LISTEN
(guarantees 2 and 3).

Every wait polls with a deadline; every subprocess is killed in a ``finally``. Setting
``KILLS_BREAK`` (see ``kills.py``) patches a breakage into the workers, to show these tests
fail when the guarantee is broken; ``KILLS_KEEP_SCHEMA=1`` keeps the schemas for a post-mortem.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from tests.e2e.support import (
    Cluster,
    Step,
    assert_each_attempt_ran_at_most_once,
    assert_each_attempt_settled_once,
    settlements,
    wait_for,
)

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]


# --- 1. SIGKILL of one of two workers -------------------------------------------------------


SHAPES = ("fan", "layers", "diamonds")


def random_workflow(rng: random.Random, shape: str) -> list[Step]:
    """A workflow of ~20-30 steps of 100-500 ms, with random attempts and dependencies."""

    def new(name: str, depends_on: Sequence[str] = ()) -> Step:
        return Step(
            name,
            ms=rng.randint(100, 500),
            max_attempts=rng.choice((1, 2, 3, 3)),
            depends_on=tuple(sorted(depends_on)),
        )

    steps: list[Step] = []
    if shape == "fan":
        steps = [new(f"f{i:02d}") for i in range(rng.randint(20, 30))]
    elif shape == "layers":
        previous: list[str] = []
        for layer in range(rng.randint(3, 4)):
            current = [f"l{layer}_{i}" for i in range(rng.randint(6, 8))]
            for name in current:
                parents = rng.sample(previous, min(len(previous), rng.randint(1, 2)))
                steps.append(new(name, parents))
            previous = current
    else:  # diamonds: root -> wide middle -> join, twice
        parent: list[str] = []
        for d in range(2):
            steps.append(new(f"d{d}_root", parent))
            middle = [f"d{d}_m{i}" for i in range(rng.randint(8, 12))]
            steps += [new(name, [f"d{d}_root"]) for name in middle]
            steps.append(new(f"d{d}_join", middle))
            parent = [f"d{d}_join"]
    return steps


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_sigkill_of_one_worker_is_recovered_at_once_by_the_other(
    seed: int, make_cluster: Callable[..., Cluster]
) -> None:
    rng = random.Random(seed)
    shape = SHAPES[seed % len(SHAPES)]
    steps = random_workflow(rng, shape)
    # Default liveness timeout (30 s): only the same-host "process gone" rule is quick.
    cluster = make_cluster(
        {
            "worker": {"max_concurrent_handlers": 3, "prefetch": 1},
            "event_system": {"polling_interval_ms": 100},
        }
    )
    a, b = cluster.start_worker("a"), cluster.start_worker("b")
    cluster.wait_started(a, b)
    preferred = (a, b) if rng.random() < 0.5 else (b, a)
    # A random moment: once a random number of handlers (up to half the workflow) started,
    # plus a random fraction of a handler's run. From that start on, every handler that
    # starts waits (``kills.py``: the hold file) until the kill is done, so the victim, a
    # worker running one of them, surely holds an attempt that cannot end; the moment is
    # made by the handlers themselves, not by the test catching it.
    starts_before_kill = rng.randint(0, len(steps) // 2)
    extra_s = rng.uniform(0.0, 0.4)
    cluster.hold.write_text(str(starts_before_kill + 1))
    task = cluster.submit(f"kill_{shape}", steps)
    by_uuid = {
        step_uuid: name
        for step_uuid, name in cluster.sql(
            "SELECT step_uuid, name FROM workflow_steps WHERE task_uuid = %s", [task]
        )
    }
    spec = {s.name: s for s in steps}
    wait_for(lambda: bool(cluster.held()), f"handler start #{starts_before_kill + 1} to be held")
    time.sleep(extra_s)
    holding = {pid for _, _, pid in cluster.held()}
    victim = next(w for w in preferred if w.pid in holding)
    survivor = b if victim is a else a
    # Frozen, it settles nothing more: the claims read now are the ones its death leaves.
    os.kill(victim.pid, signal.SIGSTOP)
    held_at_kill = cluster.claims_of(victim)
    assert {(s, n) for s, n, pid in cluster.held() if pid == victim.pid} <= set(held_at_kill)
    killed_at = datetime.now(UTC)
    killed_mono = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    victim.popen.wait(timeout=10)  # reaped: its pid is gone
    cluster.hold.unlink()  # the survivor's held handlers (if any) go on

    def recovered() -> bool:
        assert survivor.alive(), survivor.stderr()
        return any(w == victim.worker_id for _, _, w, _ in cluster.lost_rows())

    wait_for(recovered, "the survivor to recover the killed worker's claims", timeout=10)
    seen_s = time.monotonic() - killed_mono
    first_lost = min(at for _, _, w, at in cluster.lost_rows() if w == victim.worker_id)
    recovery_s = (first_lost - killed_at).total_seconds()
    print(
        f"\n[sigkill seed={seed} shape={shape} steps={len(steps)} "
        f"killed after {starts_before_kill} handler starts + {extra_s:.2f}s, "
        f"holding {len(held_at_kill)} claim(s)] recovery {recovery_s:.3f}s "
        f"(seen by the test after {seen_s:.3f}s)"
    )
    assert recovery_s < 10.0

    wait_for(lambda: cluster.open_work() == 0, "the workflow to finish", timeout=60)
    assert survivor.alive(), survivor.stderr()
    returncode = survivor.terminate()
    assert returncode == 0, survivor.stderr()
    assert "Traceback" not in survivor.stderr(), survivor.stderr()

    rows = cluster.sql(
        "SELECT step_uuid, state, attempts, max_attempts, error FROM workflow_steps "
        "WHERE task_uuid = %s",
        [task],
    )
    states = {by_uuid[s]: state for s, state, _, _, _ in rows}
    settled = settlements(cluster)
    pid_of = {victim.worker_id: victim.pid, survivor.worker_id: survivor.pid}
    assert_each_attempt_ran_at_most_once(cluster)
    ran_by = {(s, attempt): pid for s, attempt, pid in cluster.runs()}
    assert_each_attempt_settled_once(cluster)
    for step_uuid, state, attempts, max_attempts, error in rows:
        name = by_uuid[step_uuid]
        assert attempts <= max_attempts, name
        moves = [settled[step_uuid, n][0] for n in range(1, attempts + 1)]
        for n, (to_state, reason, worker_id) in enumerate(moves, start=1):
            if reason == "worker_lost":
                # Only the killed worker's claims are ever recovered.
                assert worker_id == victim.worker_id, (name, n, moves)
                assert ran_by.get((step_uuid, n), victim.pid) == victim.pid, (name, n)
            else:
                assert reason == "succeeded", (name, n, moves)
                assert to_state == "complete", (name, n, moves)
                # The attempt that succeeded is the one that ran, in its claimant's process.
                assert ran_by[step_uuid, n] == pid_of[worker_id], (name, n)
        if state == "complete":
            assert moves[-1][0] == "complete", name
        elif state == "error":
            assert error["error_type"] == "worker_lost", (name, error)
            assert attempts == max_attempts, name
            assert all(reason == "worker_lost" for _, reason, _ in moves), (name, moves)
        else:
            # Never started: a parent ended in error.
            assert state == "pending", (name, state)
            assert attempts == 0, name
            assert any(states[p] in ("error", "pending") for p in spec[name].depends_on), name
    # Each claim the victim held when it died was recovered (exactly once, checked above);
    # the held ones surely.
    for step_uuid, attempt in held_at_kill:
        reason = settled[step_uuid, attempt][0][1]
        assert reason in ("worker_lost", "succeeded"), (by_uuid[step_uuid], reason)
    for step_uuid, attempt, pid in cluster.held():
        if pid == victim.pid:
            assert settled[step_uuid, attempt][0][1] == "worker_lost", by_uuid[step_uuid]
    assert cluster.lost_rows(), "nothing was recovered"
    assert f"of lost worker(s) {victim.worker_id}" in survivor.stderr()


# --- 2. SIGSTOP past the liveness timeout, then SIGCONT ------------------------------------


def test_sigstopped_worker_is_presumed_dead_then_resumes_without_double_apply(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(
        {
            "worker": {"max_concurrent_handlers": 2, "prefetch": 0, "heartbeat_interval_s": 1},
            "event_system": {"claim_timeout_s": 3, "polling_interval_ms": 100},
        }
    )
    a, b = cluster.start_worker("a"), cluster.start_worker("b")
    cluster.wait_started(a, b)
    long_steps = [Step(f"long{i}", ms=4000 + 500 * i) for i in range(4)]
    first = cluster.submit("stop_long", long_steps)

    def a_runs_two() -> bool:
        return sum(1 for _, _, pid in cluster.runs() if pid == a.pid) == 2

    wait_for(a_runs_two, "worker a to run two long handlers")
    held = sorted(cluster.claims_of(a))
    assert len(held) == 2, held
    started_on_a = sorted((s, n) for s, n, pid in cluster.runs() if pid == a.pid)
    assert started_on_a == held
    stopped_at = datetime.now(UTC)
    os.kill(a.pid, signal.SIGSTOP)
    try:

        def both_recovered() -> bool:
            assert b.alive(), b.stderr()
            lost = {(s, n) for s, n, w, _ in cluster.lost_rows() if w == a.worker_id}
            return lost >= set(held)

        wait_for(both_recovered, "worker b to recover a's running attempts", timeout=15)
        first_lost = min(at for _, _, w, at in cluster.lost_rows() if w == a.worker_id)
        recovery_s = (first_lost - stopped_at).total_seconds()
        # Frozen, a writes no heartbeat: its last one is final.
        ((last_beat,),) = cluster.sql(
            "SELECT heartbeat_at FROM workers WHERE worker_id = %s", [a.worker_id]
        )
        silent_s = (first_lost - last_beat).total_seconds()
        print(
            f"\n[sigstop] running attempts of the stopped worker recovered after {recovery_s:.3f}s "
            f"({silent_s:.3f}s after its last heartbeat)"
        )
        # The heartbeat rule, not the "process gone" rule: the process still exists. Measured
        # from the last heartbeat, not from the stop: a heartbeat late because the machine
        # is busy moves both the rule and the bound.
        assert 3.0 <= silent_s < 3.0 + 5.0
        assert a.popen.poll() is None
    finally:
        os.kill(a.pid, signal.SIGCONT)
    resumed_at = datetime.now(UTC)

    # Its handlers wake up and finish late: their results are rejected by the guard.
    def rejected(step_uuid: str, attempt: int) -> bool:
        return f"late result for step {step_uuid} attempt {attempt} rejected" in a.stderr()

    def late_results_handled() -> bool:
        settled = settlements(cluster)
        return all(rejected(s, n) or len(settled[s, n]) > 1 for s, n in started_on_a)

    wait_for(late_results_handled, "the stopped worker's late results to be handled")
    # Guarantee 3 first: a late result applied over the recovery would settle twice.
    assert_each_attempt_settled_once(cluster, finished=False)
    assert all(rejected(s, n) for s, n in started_on_a), a.stderr()
    wait_for(
        lambda: "presumed dead" in a.stderr(), "the resumed worker to say it was presumed dead"
    )
    assert a.alive(), a.stderr()

    # It keeps working: new work, submitted once it is free (it may have claimed the retries
    # of the recovered attempts itself) and alone, is claimed and completed by it.
    wait_for(lambda: not cluster.claims_of(a), "the resumed worker to be free", timeout=20)
    assert b.alive(), b.stderr()
    assert b.terminate() == 0, b.stderr()
    second = cluster.submit("after_resume", [Step(f"short{i}", ms=300) for i in range(8)])
    wait_for(lambda: cluster.open_work() == 0, "all the work to finish", timeout=40)
    assert a.alive(), a.stderr()
    a_stderr = a.stderr()
    assert a.terminate() == 0, a_stderr
    for worker in (a, b):
        assert "Traceback" not in worker.stderr(), worker.stderr()

    # Guarantee 3: one settlement per attempt; the lost ones settled once, as worker_lost.
    assert_each_attempt_settled_once(cluster)
    assert_each_attempt_ran_at_most_once(cluster)
    settled = settlements(cluster)
    lost = [(s, n) for s, n, _, _ in cluster.lost_rows()]
    assert sorted(lost) == held, "exactly a's two running attempts are recovered, once each"
    for key in held:
        assert settled[key] == [("waiting_for_retry", "worker_lost", a.worker_id)], settled[key]
    assert f"recovered 2 running attempt(s) of lost worker(s) {a.worker_id}" in b.stderr()
    assert "running attempt(s) of lost worker" not in a_stderr
    rows = cluster.sql(
        "SELECT step_uuid, state, attempts FROM workflow_steps WHERE task_uuid = %s", [first]
    )
    for step_uuid, state, attempts in rows:
        assert state == "complete", (step_uuid, state)
        assert attempts == (2 if any(s == step_uuid for s, _ in held) else 1)
    # A's late results changed nothing: each step completed once, by its final attempt.
    completions = Counter(
        s for (s, _), moves in settled.items() for to_state, _, _ in moves if to_state == "complete"
    )
    assert set(completions.values()) == {1}
    (events,) = cluster.sql(
        "SELECT COUNT(*), COUNT(DISTINCT step_uuid) FROM domain_events "
        "WHERE name = 'step.completed'"
    )
    assert events == (12, 12)

    after = cluster.sql(
        "SELECT t.step_uuid FROM workflow_step_transitions t "
        "JOIN workflow_steps s ON s.step_uuid = t.step_uuid "
        "WHERE s.task_uuid = %s AND t.to_state = 'complete' AND t.worker_id = %s "
        "AND t.created_at > %s",
        [second, a.worker_id, resumed_at],
    )
    assert len(after) == 8, "the resumed worker did not complete the new work"


# --- 3. a busy worker never looks dead ------------------------------------------------------


def test_workers_busy_in_pure_python_never_look_dead(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(
        {
            "worker": {"max_concurrent_handlers": 4, "prefetch": 0, "heartbeat_interval_s": 0.5},
            # Eight beats' margin: on a loaded machine the heartbeat thread of a process
            # whose four handlers hold the GIL has been seen 2.5 s late. A heartbeat that
            # waits for a handler is late by a whole burn (6 to 8 s) and still fails this.
            "event_system": {"claim_timeout_s": 4.0, "polling_interval_ms": 100},
        }
    )
    # A namespace each, and a task of 8 burning steps each: both are saturated, four at a
    # time, whichever happens to poll first.
    a = cluster.start_worker("a", env={"DUPLEX_WORKER__NAMESPACES": '["burn_a"]'})
    b = cluster.start_worker("b", env={"DUPLEX_WORKER__NAMESPACES": '["burn_b"]'})
    cluster.wait_started(a, b)
    rng = random.Random(7)
    steps = [
        Step(f"burn{i:02d}", ms=rng.randint(6000, 8000), handler="kills.burn") for i in range(16)
    ]
    cluster.submit("burn", steps[:8], namespace="burn_a")
    cluster.submit("burn", steps[8:], namespace="burn_b")

    oldest: dict[str, float] = defaultdict(float)
    deadline = time.monotonic() + 60
    while cluster.open_work():
        assert time.monotonic() < deadline, "the burning workflow did not finish in 60 s"
        assert a.alive(), a.stderr()
        assert b.alive(), b.stderr()
        for worker_id, age in cluster.sql(
            "SELECT worker_id, EXTRACT(EPOCH FROM clock_timestamp() - heartbeat_at)::float "
            "FROM workers WHERE stopped_at IS NULL"
        ):
            oldest[worker_id] = max(oldest[worker_id], age)
        time.sleep(0.05)
    print(
        "\n[busy] oldest heartbeat seen: "
        + ", ".join(f"{w.name} {oldest[w.worker_id]:.2f}s" for w in (a, b))
    )
    assert a.terminate() == 0, a.stderr()
    assert b.terminate() == 0, b.stderr()

    assert cluster.lost_rows() == [], "a busy worker was presumed dead"
    rows = cluster.sql("SELECT state, attempts FROM workflow_steps")
    assert rows == [("complete", 1)] * 16
    runs = assert_each_attempt_ran_at_most_once(cluster)
    assert len(runs) == 16
    assert_each_attempt_settled_once(cluster)
    # Both were saturated: each ran its namespace's eight handlers, four at a time.
    pids = Counter(pid for _, _, pid in cluster.runs())
    assert pids == {a.pid: 8, b.pid: 8}, pids


# --- 4. PostgreSQL connections terminated ---------------------------------------------------


def _terminate_blocked(cluster: Cluster, admin: psycopg.Connection[Any], kind: str) -> bool:
    """Block a claim or a commit of the worker mid-transaction, then terminate its backend.

    A claim is held at its transition insert (``workflow_step_transitions`` locked), after its
    UPDATE has claimed the steps; a commit at its ``FOR UPDATE`` of the task rows (``tasks``
    locked), after it read its claims. A claim is told from a commit by the task row locks a
    commit holds. Terminating the backend rolls the transaction back, never half-commits it.
    """
    table = "workflow_step_transitions" if kind == "claim" else "tasks"
    with psycopg.connect(cluster.conninfo("duplex-faults-locker")) as locker:
        locker.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for pid, query, locks_tasks in admin.execute(
                "SELECT a.pid, a.query, EXISTS (SELECT 1 FROM pg_locks l"
                "  JOIN pg_class c ON c.oid = l.relation"
                "  WHERE l.pid = a.pid AND c.relname = 'tasks' AND l.mode = 'RowShareLock')"
                " FROM pg_stat_activity a"
                " WHERE a.application_name = %s AND a.wait_event_type = 'Lock'",
                [cluster.app_name],
            ).fetchall():
                if kind == "claim":
                    hit = "workflow_step_transitions" in query and not locks_tasks
                else:
                    hit = "FOR UPDATE" in query and "SKIP LOCKED" not in query
                if hit:
                    admin.execute("SELECT pg_terminate_backend(%s)", [pid])
                    locker.rollback()
                    return True
            time.sleep(0.005)
        locker.rollback()
    return False


def _listen_pids(cluster: Cluster, admin: psycopg.Connection[Any]) -> list[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND query LIKE 'LISTEN%%'",
        [cluster.app_name],
    ).fetchall()
    return [pid for (pid,) in rows]


def _terminate_listen_and_idle(cluster: Cluster, admin: psycopg.Connection[Any]) -> bool:
    """Terminate the LISTEN connection and the idle pooled ones (none is inside a transaction)."""
    before = _listen_pids(cluster, admin)
    if not before:
        return False
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = %s AND state = 'idle' AND pid <> pg_backend_pid()",
        [cluster.app_name],
    )

    def listening_again() -> bool:
        now = _listen_pids(cluster, admin)
        return bool(now) and not set(now) & set(before)

    wait_for(listening_again, "the worker to LISTEN again on a new connection", timeout=10)
    return True


KINDS = ("claim", "commit", "listen")
ROUNDS = 3


def test_terminated_connections_lose_nothing_and_announce_only_committed_events(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(
        {
            "worker": {"max_concurrent_handlers": 3, "prefetch": 1},
            "event_system": {"deployment_mode": "hybrid", "polling_interval_ms": 200},
        }
    )
    checked, missing = cluster.directory / "events.checked", cluster.directory / "events.missing"
    cluster.env.update(
        KILLS_EVENTS_DB=cluster.conninfo("duplex-faults-subscriber"),
        KILLS_EVENTS_CHECKED=str(checked),
        KILLS_EVENTS_MISSING=str(missing),
    )
    worker = cluster.start_worker("w")
    cluster.wait_started(worker)
    admin = psycopg.connect(cluster.conninfo("duplex-faults-admin"), autocommit=True)
    try:
        wait_for(lambda: bool(_listen_pids(cluster, admin)), "the worker to LISTEN")
        rng = random.Random(5)
        tasks: list[str] = []

        def chains() -> None:
            """Ten chains of five: commits make dependents ready all along."""
            steps = [
                Step(
                    f"c{chain}_{link}",
                    ms=rng.randint(150, 300),
                    depends_on=(f"c{chain}_{link - 1}",) if link else (),
                )
                for chain in range(10)
                for link in range(5)
            ]
            tasks.append(cluster.submit("terminated", steps))

        hits: Counter[str] = Counter()
        tries: Counter[str] = Counter()
        while any(hits[k] < ROUNDS for k in KINDS):
            # Work never runs out while the test needs claims and commits to block: more
            # chains whenever fewer than six steps are ready or running (three slots).
            if cluster.open_work() < 6:
                chains()
            kind = min(KINDS, key=lambda k: (hits[k], tries[k]))
            assert tries[kind] < ROUNDS + 2, f"too many missed {kind} rounds: {dict(hits)}"
            tries[kind] += 1
            if kind == "listen":
                hit = _terminate_listen_and_idle(cluster, admin)
            else:
                if kind == "commit":
                    # A commit comes when a running handler ends: the claims must not be
                    # the ones blocked.
                    wait_for(lambda: bool(cluster.claims_of(worker)), "a running handler")
                hit = _terminate_blocked(cluster, admin, kind)
            hits[kind] += hit
            assert worker.alive(), worker.stderr()
            time.sleep(0.1)
        print(f"\n[terminate] backends terminated: {dict(hits)}")
        wait_for(lambda: cluster.open_work() == 0, "the workflow to finish", timeout=60)
        wait_for(lambda: bool(_listen_pids(cluster, admin)), "the worker to LISTEN at the end")
        assert worker.alive(), worker.stderr()
        assert cluster.sql("SELECT pid FROM workers") == [(worker.pid,)], "the worker restarted"
        stderr = worker.stderr()
        assert worker.terminate() == 0, stderr
    finally:
        admin.close()
    stderr = worker.stderr()
    assert "Traceback" not in stderr, stderr
    for kind in KINDS:
        assert hits[kind] == ROUNDS, f"{hits[kind]} {kind} termination(s): {dict(hits)}"
    assert "claim failed" in stderr
    assert "result(s) failed" in stderr
    assert "LISTEN connection lost" in stderr

    total = 50 * len(tasks)
    rows = cluster.sql("SELECT state, attempts FROM workflow_steps")
    assert sorted(rows) == [("complete", 1)] * total
    assert_each_attempt_settled_once(cluster)
    runs = assert_each_attempt_ran_at_most_once(cluster)
    assert len(runs) == total
    committed = {event_id for (event_id,) in cluster.sql("SELECT event_id FROM domain_events")}
    assert len(committed) == total  # a step.completed per step
    missing_lines = missing.read_text().splitlines() if missing.exists() else []
    assert not missing_lines, (
        f"{len(missing_lines)} event(s) delivered before (or without) their commit, "
        f"e.g. {missing_lines[:3]}"
    )
    delivered = Counter(checked.read_text().splitlines())
    assert set(delivered) == committed, "every committed event is delivered, and only those"
    assert set(delivered.values()) == {1}, "each event is delivered once"
