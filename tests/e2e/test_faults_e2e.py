"""Faults end to end: failing actors, SIGKILL, SIGTERM while commits fail, bad settings.

Every test drives real ``python -m duplex`` (or ``duplex``) subprocesses against a SQLite file,
with real signals and no mock of the worker. Faults are injected from inside the worker by
``tests/e2e_handlers/faults.py``, which the worker imports as a handler module and which
reads ``E2E_FAULT`` (see there). Guarantees covered (docs/architecture.md, Guarantees):

* 3 -- every claim ends in exactly one result: checked on the ``workflow_step_transitions``
  history after every scenario (``assert_history``) and on the handlers' own run log;
* 7 -- nothing lost on stop: SIGTERM while the database refuses every commit;
* 8 -- failures are contained: an exception in each actor in turn;
* 9 -- a dead worker is noticed in seconds: SIGKILL, then a restart on the same host.

To prove that a test notices a broken guarantee, run it with ``E2E_BREAK=<name>`` (the
breakages are listed in ``faults.BREAKAGES``); the worker then preloads ``faults.py`` (through
a ``sitecustomize`` in the test's directory, so that even settings loading can be broken).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.cli.support import Duplex, make_duplex, migrated_file, wait_for

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
FAULTS_MODULE = "tests.e2e_handlers.faults"
FAULT_ENV = "E2E_FAULT"
BREAK_ENV = "E2E_BREAK"
DONE_LOG_ENV = "E2E_DONE_LOG"
FAULT_LOG_ENV = "E2E_FAULT_LOG"
HOLD_AT_ENV = "E2E_HOLD_AT"
HOLD_GATE_ENV = "E2E_HOLD_GATE"

# A worker whose actor failed must have exited this long after the fault at the latest.
EXIT_BOUND_S = 30.0
# Any one run to completion; a hang fails the test instead of stalling the suite.
RUN_TIMEOUT_S = 60.0
# Recovery of a dead local worker's claims must be this quick (claim_timeout_s is 30).
RECOVERY_BOUND_S = 10.0

OUTCOME_STATES = ("complete", "waiting_for_retry", "error")
LOG_HEADER = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (?P<level>[A-Z]+)\s")
CHAINED = (
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
)


# --- working directories --------------------------------------------------------------------


def _toml_sections(sections: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def write_settings(
    duplex: Duplex,
    *,
    worker: dict[str, Any] | None = None,
    event_system: dict[str, Any] | None = None,
    database: dict[str, Any] | None = None,
) -> None:
    """(Re)write the directory's settings.toml: fast polling, short backoff, our handlers."""
    sections: dict[str, dict[str, Any]] = {
        "database": {"url": f"sqlite:///{duplex.db_path}", **(database or {})},
        "worker": {
            "namespaces": ["default"],
            "handler_modules": [FAULTS_MODULE],
            "max_concurrent_handlers": 4,
            "prefetch": 2,
            "handler_timeout_ms": 30_000,
            "shutdown_timeout_ms": 10_000,
            **(worker or {}),
        },
        "event_system": {
            "deployment_mode": "polling",
            "polling_interval_ms": 25,
            **(event_system or {}),
        },
        "retry": {"backoff_base_ms": 50, "jitter": 0.0},
        "logging": {"level": "INFO"},
    }
    (duplex.cwd / "settings.toml").write_text(_toml_sections(sections))


def fault_dir(
    directory: Path,
    migrated: Path | None,
    *,
    worker: dict[str, Any] | None = None,
    event_system: dict[str, Any] | None = None,
    database: dict[str, Any] | None = None,
) -> Duplex:
    """A working directory for the fault tests, with a migrated database when given one."""
    duplex = make_duplex(directory, handler_modules=(FAULTS_MODULE,))
    write_settings(duplex, worker=worker, event_system=event_system, database=database)
    if migrated is not None:
        shutil.copyfile(migrated, duplex.db_path)
    duplex.env[DONE_LOG_ENV] = str(directory / "done.log")
    duplex.env[FAULT_LOG_ENV] = str(directory / "fault.log")
    duplex.env.pop(FAULT_ENV, None)
    if os.environ.get(BREAK_ENV):
        # Preload the faults module in every subprocess, before settings are read.
        preload = directory / "preload"
        preload.mkdir(exist_ok=True)
        (preload / "sitecustomize.py").write_text(f"import {FAULTS_MODULE}\n")
        duplex.env["PYTHONPATH"] = f"{preload}{os.pathsep}{REPO_ROOT}"
    return duplex


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database file brought to head once, copied by each test."""
    return migrated_file(fault_dir(tmp_path_factory.mktemp("migrated"), None))


# --- workflows --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSpec:
    name: str
    depends_on: tuple[str, ...]
    seconds: float
    max_attempts: int


def random_workflow(
    rng: random.Random,
    count: int,
    *,
    shape: str,
    seconds: tuple[float, float],
    max_attempts: Sequence[int],
) -> list[StepSpec]:
    """Draw a DAG: ``wide`` (all independent), ``fan_out`` (a few hubs with many children),
    or ``dag`` (up to two parents among all earlier steps)."""
    specs: list[StepSpec] = []
    for i in range(count):
        earlier = [s.name for s in specs]
        if shape == "wide" or not earlier:
            parents: list[str] = []
        elif shape == "fan_out":
            hubs = earlier[:3]
            parents = rng.sample(hubs, rng.randint(0 if i > 3 else 1, min(2, len(hubs))))
        else:
            parents = rng.sample(earlier, rng.randint(0, min(2, len(earlier))))
        specs.append(
            StepSpec(
                name=f"s{i:02d}",
                depends_on=tuple(sorted(parents)),
                seconds=round(rng.uniform(*seconds), 3),
                max_attempts=rng.choice(list(max_attempts)),
            )
        )
    return specs


def write_template(
    path: Path, name: str, specs: Iterable[StepSpec], *, gate: Path | None = None
) -> Path:
    """A template of ``faults.work`` steps; with ``gate``, each waits at that gate file."""
    at_gate = f", gate = {json.dumps(str(gate))}" if gate is not None else ""
    parts = [f'name = "{name}"\nversion = "1.0.0"\n']
    for spec in specs:
        parts.append(
            f'\n[[steps]]\nname = "{spec.name}"\nhandler = "faults.work"\n'
            f"depends_on = {json.dumps(list(spec.depends_on))}\n"
            f"max_attempts = {spec.max_attempts}\n"
            f"inputs = {{ seconds = {spec.seconds}{at_gate} }}\n"
        )
    path.write_text("".join(parts))
    return path


# --- reading back what happened ---------------------------------------------------------------


def step_rows(duplex: Duplex, task: str) -> dict[str, dict[str, Any]]:
    """Return ``step_uuid -> row`` for a task's steps (name, state, attempts, error...)."""
    rows = duplex.sql(
        "SELECT step_uuid, name, state, attempts, max_attempts, error FROM workflow_steps "
        "WHERE task_uuid = ?",
        [task],
    )
    return {
        step_uuid: {
            "name": name,
            "state": state,
            "attempts": attempts,
            "max_attempts": max_attempts,
            "error": json.loads(error) if error else None,
        }
        for step_uuid, name, state, attempts, max_attempts, error in rows
    }


def read_log(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        if line.strip():
            step_uuid, attempt = line.split()
            entries.append((step_uuid, int(attempt)))
    return entries


def started(duplex: Duplex) -> list[tuple[str, int]]:
    """The ``(step_uuid, attempt)`` of every handler start, from the run log."""
    return read_log(duplex.run_log)


def fault_log(duplex: Duplex) -> list[str]:
    path = Path(duplex.env[FAULT_LOG_ENV])
    return path.read_text().splitlines() if path.exists() else []


@dataclass
class History:
    """A task's transitions, walked step by step (see ``assert_history``)."""

    outcomes: dict[tuple[str, int], tuple[str, str]]  # (step, attempt) -> (to_state, reason)
    open_claims: dict[str, int]  # step -> attempt claimed and not settled

    def with_reason(self, reason: str) -> set[tuple[str, int]]:
        return {key for key, (_, why) in self.outcomes.items() if why == reason}


def assert_history(duplex: Duplex, task: str) -> History:
    """Guarantee 3 on the transition rows: every claim ends in exactly one result.

    * no attempt has two outcomes (rows leaving ``in_progress`` for a result state);
    * every attempt that ran was claimed once, plus once for each time it was handed back
      unstarted (a hand-back records ``in_progress -> enqueued`` with the count taken back);
    * each step's rows chain (``from_state`` is the previous ``to_state``), end in the step's
      current state, and a claim is settled before the next one.
    """
    doubles = duplex.sql(
        "SELECT t.step_uuid, t.attempt, COUNT(*) FROM workflow_step_transitions t "
        "JOIN workflow_steps s ON s.step_uuid = t.step_uuid "
        "WHERE s.task_uuid = ? AND t.from_state = 'in_progress' "
        "AND t.to_state IN ('complete', 'waiting_for_retry', 'error') "
        "GROUP BY t.step_uuid, t.attempt HAVING COUNT(*) > 1",
        [task],
    )
    assert doubles == [], f"attempts with more than one outcome: {doubles}"
    claims = Counter(
        {
            (step_uuid, attempt): count
            for step_uuid, attempt, count in duplex.sql(
                "SELECT t.step_uuid, t.attempt, COUNT(*) FROM workflow_step_transitions t "
                "JOIN workflow_steps s ON s.step_uuid = t.step_uuid "
                "WHERE s.task_uuid = ? AND t.to_state = 'in_progress' "
                "GROUP BY t.step_uuid, t.attempt",
                [task],
            )
        }
    )
    releases = Counter(
        {
            (step_uuid, attempt + 1): count
            for step_uuid, attempt, count in duplex.sql(
                "SELECT t.step_uuid, t.attempt, COUNT(*) FROM workflow_step_transitions t "
                "JOIN workflow_steps s ON s.step_uuid = t.step_uuid "
                "WHERE s.task_uuid = ? AND t.from_state = 'in_progress' "
                "AND t.to_state IN ('enqueued', 'cancelled') "
                "GROUP BY t.step_uuid, t.attempt",
                [task],
            )
        }
    )
    rows = duplex.sql(
        "SELECT t.step_uuid, t.from_state, t.to_state, t.attempt, t.reason "
        "FROM workflow_step_transitions t JOIN workflow_steps s ON s.step_uuid = t.step_uuid "
        "WHERE s.task_uuid = ? ORDER BY t.id",
        [task],
    )
    current: dict[str, str] = {}
    history = History(outcomes={}, open_claims={})
    for step_uuid, from_state, to_state, attempt, reason in rows:
        where = f"step {step_uuid}: {from_state} -> {to_state} (attempt {attempt}, {reason})"
        assert from_state == current.get(step_uuid), f"{where} after {current.get(step_uuid)}"
        if to_state == "in_progress":
            assert step_uuid not in history.open_claims, f"{where}: claimed while claimed"
            history.open_claims[step_uuid] = attempt
        elif from_state == "in_progress":
            claimed = history.open_claims.pop(step_uuid)
            if to_state in OUTCOME_STATES:
                assert attempt == claimed, f"{where}: outcome of attempt {claimed}'s claim"
                history.outcomes[step_uuid, attempt] = (to_state, reason)
            else:
                assert to_state in ("enqueued", "cancelled"), where
                assert attempt == claimed - 1, f"{where}: hand-back of attempt {claimed}"
        current[step_uuid] = to_state
    for step_uuid, row in step_rows(duplex, task).items():
        assert current.get(step_uuid) == row["state"], (step_uuid, row, current.get(step_uuid))
        if row["state"] == "in_progress":
            assert history.open_claims.get(step_uuid) == row["attempts"], (step_uuid, row)
    # One claim per attempt that ran (settled, or running now), plus one per hand-back.
    live = set(history.outcomes) | set(history.open_claims.items())
    wrong = {
        key: (n, releases[key])
        for key, n in claims.items()
        if n != releases[key] + (1 if key in live else 0)
    }
    assert not wrong, f"(claims, hand-backs) per attempt do not add up: {wrong}"
    return history


def assert_runs(duplex: Duplex, task: str, history: History) -> Counter[str]:
    """No handler ran more often than its step's attempts; no attempt started twice."""
    starts = Counter(started(duplex))
    twice = {key: n for key, n in starts.items() if n > 1}
    assert not twice, f"attempts whose handler started more than once: {twice}"
    rows = step_rows(duplex, task)
    per_step = Counter(step_uuid for step_uuid, _ in starts)
    for step_uuid, runs in per_step.items():
        row = rows[step_uuid]
        assert runs <= row["attempts"] <= row["max_attempts"], (row, runs)
    for (step_uuid, attempt), (to_state, _) in history.outcomes.items():
        if to_state == "complete":
            assert (step_uuid, attempt) in starts, f"{step_uuid} attempt {attempt} never ran"
    return per_step


def claimed_attempts(duplex: Duplex, task: str) -> set[tuple[str, int]]:
    """The attempts that are in progress right now: ``(step_uuid, attempt)``."""
    rows = duplex.sql(
        "SELECT step_uuid, attempts FROM workflow_steps WHERE task_uuid = ? "
        "AND state = 'in_progress'",
        [task],
    )
    return {(step_uuid, attempts) for step_uuid, attempts in rows}


def first_worker_lost_after(duplex: Duplex, task: str, since: datetime) -> float | None:
    """Seconds from ``since`` to the first ``worker_lost`` transition written after it."""
    rows = duplex.sql(
        "SELECT MIN(t.created_at) FROM workflow_step_transitions t "
        "JOIN workflow_steps s ON s.step_uuid = t.step_uuid "
        "WHERE s.task_uuid = ? AND t.reason = 'worker_lost' AND t.created_at >= ?",
        [task, since.strftime("%Y-%m-%d %H:%M:%S.%f")],
    )
    if rows[0][0] is None:
        return None
    first = datetime.fromisoformat(rows[0][0]).replace(tzinfo=UTC)
    return (first - since).total_seconds()


def assert_no_uncaught_traceback(stderr: str, *, allowed_failures: int | None = None) -> int:
    """The only tracebacks on stderr are pykka's logged reports of a failed actor.

    A logged traceback directly follows its log line (or a chained-exception sentence of the
    same report); anything else -- an uncaught exception in the CLI, ``Exception in thread``
    from a thread that died -- fails. Returns how many actor-failure reports there were.
    """
    assert "Exception in thread" not in stderr, stderr
    assert "duplex: internal error" not in stderr, stderr
    lines = stderr.splitlines()
    reports = 0
    for i, line in enumerate(lines):
        if not line.startswith("Traceback (most recent call last)"):
            continue
        before = lines[i - 1] if i else ""
        if before == "" and i >= 2 and lines[i - 2] in CHAINED:
            continue
        header = LOG_HEADER.match(before)
        assert header, f"traceback not under a log line (line {i}): {before!r}\n{stderr}"
        assert header["level"] in ("ERROR", "CRITICAL"), f"traceback under {before!r}"
        assert "Unhandled exception in" in before, f"unexpected logged traceback: {before!r}"
        reports += 1
    if allowed_failures is not None:
        assert reports <= allowed_failures, stderr
    return reports


def the_error_line(stderr: str) -> str:
    """Exactly one ``duplex: error:`` line, and it is the last line on stderr."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("duplex: error:")]
    assert len(errors) == 1, stderr
    assert lines[-1] == errors[0], stderr
    return errors[0]


def run_bounded(
    duplex: Duplex, *args: str, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; fail (the child killed) if it takes over ``timeout``."""
    try:
        return duplex.run(*args, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed and reaped it
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        pytest.fail(f"`duplex {' '.join(args)}` still running after {timeout:g}s:\n{stderr}")


def kill_and_reap(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


# --- 1. an exception in each actor ------------------------------------------------------------


def with_a_chain(specs: list[StepSpec], length: int) -> list[StepSpec]:
    """``specs`` and a chain of ``length`` steps after the last one."""
    chain = [
        StepSpec(f"chain{i}", (f"chain{i - 1}" if i else specs[-1].name,), 0.03, 3)
        for i in range(length)
    ]
    return [*specs, *chain]


def critical_path(specs: Sequence[StepSpec]) -> int:
    """The most steps on one path of the DAG (parents come first in ``specs``)."""
    depth: dict[str, int] = {}
    for spec in specs:
        depth[spec.name] = 1 + max((depth[p] for p in spec.depends_on), default=0)
    return max(depth.values())


# Every step of a path is claimed after its parent's result committed: a workflow whose
# longest path has 12 steps takes 12 rounds of claim, handler and commit. Each fault below
# strikes by the 8th of something (claims, commands, dispatches, freed slots, results,
# commits), so it always lands before the end however fast or slow the worker runs: a fault
# in the claim or commit path stops the rounds at once; one in the DomainEventPublisher lets
# them go on only until the watchdog stops intake, far from the 7 rounds still needed. The
# chain makes that path.
FAULT_WORKFLOW = with_a_chain(
    random_workflow(
        random.Random(2024), 30, shape="dag", seconds=(0.02, 0.05), max_attempts=[3, 4]
    ),
    8,
)
assert critical_path(FAULT_WORKFLOW) >= 12

FRAMEWORK_FAULTS = [
    "EventSystem.claimed:6",
    "CommandProcessor.handle:6",
    "StepExecutor.execute:6",
    "StepExecutor.hand_off:4",
    "Dispatcher.dispatch:4",
    "Dispatcher.slot_freed:8",
    "CompletionProcessor.submit:8",
    "CompletionProcessor.flush:4",
    "DomainEventPublisher.publish:4",
]


@pytest.mark.parametrize("fault", FRAMEWORK_FAULTS)
def test_actor_failure_stops_the_worker_and_a_restart_finishes(
    tmp_path: Path, migrated: Path, fault: str
) -> None:
    """Guarantee 8 (and 3): a framework actor that fails stops the worker in order, non-zero,
    with one error line naming it; no attempt gets two outcomes; a restart finishes the work."""
    actor = fault.split(".")[0]
    duplex = fault_dir(tmp_path / "work", migrated)
    template = write_template(tmp_path / "faulty.toml", "e2e_faulty", FAULT_WORKFLOW)
    task = duplex.submit(template)

    began = time.monotonic()
    # The fault fires within the first seconds; the exit must follow within EXIT_BOUND_S.
    crashed = run_bounded(
        duplex, "run", "--until-idle", env={FAULT_ENV: fault}, timeout=EXIT_BOUND_S
    )
    ended = time.time()
    took = time.monotonic() - began
    stderr = crashed.stderr
    fired = fault_log(duplex)
    assert len(fired) == 1, (fired, stderr)
    fired_at = float(fired[0].split()[1])
    print(f"{fault}: exited {ended - fired_at:.2f}s after the fault ({took:.2f}s in all)")

    assert crashed.returncode == 1, stderr
    assert ended - fired_at < EXIT_BOUND_S, stderr
    assert f"actor {actor} failed" in stderr, stderr
    line = the_error_line(stderr)
    assert f"actor {actor} failed" in line, line
    assert "injected fault" in line, line
    assert_no_uncaught_traceback(stderr, allowed_failures=1)
    assert "RuntimeError: injected fault" in stderr

    rows = step_rows(duplex, task)
    states = Counter(row["state"] for row in rows.values())
    # The fault hit in the middle of the run (see FAULT_WORKFLOW): some steps done, some not.
    assert 0 < states["complete"] < len(FAULT_WORKFLOW), states
    history = assert_history(duplex, task)
    assert_runs(duplex, task, history)
    in_flight = claimed_attempts(duplex, task)
    ran = set(started(duplex))
    print(
        f"{fault}: {states['complete']} steps complete at the crash; {len(in_flight)} attempt(s) "
        f"left in progress ({len(in_flight & ran)} of them had started their handler)"
    )
    assert history.with_reason("worker_lost") == set()
    # The worker recorded its stop: whoever comes next recovers its claims at once.
    assert duplex.sql("SELECT COUNT(*) FROM workers WHERE stopped_at IS NULL") == [(0,)]

    restart = run_bounded(duplex, "run", "--until-idle", timeout=RUN_TIMEOUT_S)
    assert restart.returncode == 0, restart.stderr
    assert "Traceback" not in restart.stderr, restart.stderr
    rows = step_rows(duplex, task)
    assert {row["state"] for row in rows.values()} == {"complete"}, rows
    history = assert_history(duplex, task)
    assert_runs(duplex, task, history)
    # Exactly the attempts left running by the crash were recovered, each once.
    assert history.with_reason("worker_lost") == in_flight
    assert duplex.sql("SELECT state FROM tasks WHERE task_uuid = ?", [task]) == [("complete",)]


def test_handler_worker_failure_restarts_it(tmp_path: Path, migrated: Path) -> None:
    """Guarantee 8, restart policy: a HandlerWorker that fails is replaced; its attempt is
    settled as handler_worker_failed and retried; the run finishes and exits 0."""
    duplex = fault_dir(tmp_path / "work", migrated)
    template = write_template(tmp_path / "faulty.toml", "e2e_faulty", FAULT_WORKFLOW)
    task = duplex.submit(template)

    result = run_bounded(
        duplex, "run", "--until-idle", env={FAULT_ENV: "HandlerWorker.run:8"}, timeout=EXIT_BOUND_S
    )
    stderr = result.stderr
    assert result.returncode == 0, stderr
    assert "duplex: error" not in stderr, stderr
    assert re.search(r"actor HandlerWorker \d+ failed \(RuntimeError: injected fault\)", stderr)
    assert_no_uncaught_traceback(stderr, allowed_failures=1)
    (fired,) = fault_log(duplex)
    _, _, step_uuid, attempt_text = fired.split()
    attempt = int(attempt_text)

    rows = step_rows(duplex, task)
    assert {row["state"] for row in rows.values()} == {"complete"}, rows
    history = assert_history(duplex, task)
    assert_runs(duplex, task, history)
    assert history.outcomes[step_uuid, attempt] == ("waiting_for_retry", "handler_worker_failed")
    assert history.outcomes[step_uuid, attempt + 1] == ("complete", "succeeded")
    assert rows[step_uuid]["attempts"] == attempt + 1
    # The fault struck before the handler ran; the retry ran it.
    starts = started(duplex)
    assert (step_uuid, attempt) not in starts
    assert (step_uuid, attempt + 1) in starts
    # Every other step went through in one attempt.
    others = {key for key in history.outcomes if key[0] != step_uuid}
    assert all(a == 1 for _, a in others), others


# --- 2. SIGKILL at random moments -------------------------------------------------------------


def blocked_by_error(specs: Sequence[StepSpec], states: dict[str, str]) -> set[str]:
    """Names of steps that some ancestor in ``error`` keeps from ever running."""
    blocked: set[str] = set()
    for spec in specs:  # parents come first
        if any(states[p] == "error" or p in blocked for p in spec.depends_on):
            blocked.add(spec.name)
    return blocked


def open_steps(duplex: Duplex, task: str) -> int:
    """Steps of ``task`` that could still run: enqueued, in progress or waiting for retry."""
    rows = duplex.sql(
        "SELECT COUNT(*) FROM workflow_steps WHERE task_uuid = ? "
        "AND state IN ('enqueued', 'in_progress', 'waiting_for_retry')",
        [task],
    )
    return int(rows[0][0])


def run_then_sigkill(duplex: Duplex, task: str, delay_s: float, hold_at: int) -> None:
    """Start ``duplex run``; SIGKILL it ``delay_s`` after its first handler started, and not
    before its ``hold_at``-th handler started: that handler waits at a gate that never opens
    (``E2E_HOLD_AT``), so its attempt is surely running at the kill, however fast or slow the
    machine is. With no step left that could run, the kill comes at once."""
    before = len(started(duplex))
    hold = {HOLD_AT_ENV: str(hold_at), HOLD_GATE_ENV: str(duplex.cwd / "never-opened")}
    worker = duplex.start("run", env=hold)

    def starts() -> int:
        assert worker.poll() is None, duplex.stderr_text()
        return len(started(duplex)) - before

    wait_for(lambda: starts() > 0 or not open_steps(duplex, task), "a handler to start")
    first_start = time.monotonic()
    wait_for(
        lambda: starts() >= hold_at or not open_steps(duplex, task),
        f"handler start #{hold_at}",
    )
    time.sleep(max(0.0, first_start + delay_s - time.monotonic()))  # the random moment
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)


@pytest.mark.parametrize("seed", [3, 17, 29, 58])
def test_sigkill_at_a_random_moment_then_restart(tmp_path: Path, migrated: Path, seed: int) -> None:
    """Guarantees 9 and 3: after SIGKILL of the only worker, a restart on the same host
    recovers its running attempts at once (claim_timeout_s stays 30), each exactly once, as
    worker_lost; every step ends complete, or in error once its attempts ran out; no
    attempt's handler started twice."""
    rng = random.Random(seed)
    concurrency = rng.choice([2, 3, 4])
    shape = rng.choice(["wide", "fan_out", "dag"])
    specs = random_workflow(
        rng, rng.randint(24, 40), shape=shape, seconds=(0.05, 0.25), max_attempts=[1, 2, 3]
    )
    # Scale the sleeps to 3-4.5 s of work: the kills, 1.2-2 s after the first handler start,
    # land among running handlers, and after the watchdog's first recovery pass (1 s in),
    # which must leave the worker's own claims alone.
    work_s = sum(s.seconds for s in specs) / concurrency
    scale = rng.uniform(3.0, 4.5) / work_s
    specs = [dataclasses.replace(s, seconds=round(s.seconds * scale, 3)) for s in specs]
    kill_delays = [rng.uniform(1.2, 2.0) for _ in range(rng.choice([1, 2]))]
    # The first kill holds a handler start from the first half of the workflow, so it always
    # lands mid-run; a later one holds the first start, if any step is left to start.
    hold_at = [rng.randint(1, len(specs) // 2), *[1] * (len(kill_delays) - 1)]
    print(
        f"seed {seed}: {len(specs)} steps, {shape}, concurrency {concurrency}, "
        f"kills {[round(d, 2) for d in kill_delays]}s after the first handler start, "
        f"not before handler start {hold_at}"
    )

    duplex = fault_dir(tmp_path / "work", migrated, worker={"max_concurrent_handlers": concurrency})
    task = duplex.submit(write_template(tmp_path / "random.toml", f"e2e_kill_{seed}", specs))
    lost: set[tuple[str, int]] = set()  # attempts running when a worker was killed
    pending_recovery: set[tuple[str, int]] = set()
    for round_no, delay in enumerate(kill_delays):
        since = datetime.now(UTC)
        run_then_sigkill(duplex, task, delay, hold_at[round_no])
        if pending_recovery:
            recovered_in = first_worker_lost_after(duplex, task, since)
            assert recovered_in is not None, "the previous kill's attempts were not recovered"
            print(f"round {round_no}: recovered {recovered_in:.2f}s after the restart")
            assert recovered_in < RECOVERY_BOUND_S
        in_flight = claimed_attempts(duplex, task)
        # The first kill always lands mid-run (on the held attempt at least); a later one
        # may find the work done, or blocked behind a step whose only attempt was lost.
        assert in_flight or round_no > 0, "killed while no attempt was running"
        lost |= in_flight
        pending_recovery = in_flight
        history = assert_history(duplex, task)
        assert_runs(duplex, task, history)

    since = datetime.now(UTC)
    began = time.monotonic()
    final = run_bounded(duplex, "run", "--until-idle", timeout=RUN_TIMEOUT_S)
    took = time.monotonic() - began
    assert final.returncode == 0, final.stderr
    assert "Traceback" not in final.stderr, final.stderr
    if pending_recovery:
        recovered_in = first_worker_lost_after(duplex, task, since)
        assert recovered_in is not None, final.stderr
        print(f"final restart: first worker_lost {recovered_in:.2f}s after start ({took:.2f}s)")
        assert recovered_in < RECOVERY_BOUND_S

    history = assert_history(duplex, task)
    per_step = assert_runs(duplex, task, history)
    # Exactly the attempts running at a kill were recovered, each once (by the guard above).
    assert history.with_reason("worker_lost") == lost
    rows = step_rows(duplex, task)
    by_name = {row["name"]: row for row in rows.values()}
    uuid_of = {row["name"]: step_uuid for step_uuid, row in rows.items()}
    blocked = blocked_by_error(specs, {name: row["state"] for name, row in by_name.items()})
    for spec in specs:
        row = by_name[spec.name]
        if row["state"] == "error":
            # Out of attempts: every one of them was lost with a killed worker.
            assert row["attempts"] == spec.max_attempts, row
            assert row["error"]["error_type"] == "worker_lost", row
            assert all((uuid_of[spec.name], a) in lost for a in range(1, spec.max_attempts + 1)), (
                row
            )
        elif spec.name in blocked:
            assert row["state"] == "pending", row
            assert row["attempts"] == 0, row
        else:
            assert row["state"] == "complete", row
        assert per_step[uuid_of[spec.name]] <= spec.max_attempts
    assert open_steps(duplex, task) == 0


# --- 3. SIGTERM while every commit fails ------------------------------------------------------


def test_sigterm_while_commits_fail_reports_and_recovers(tmp_path: Path, migrated: Path) -> None:
    """Guarantee 7 (and 9): with the database locked by another process, SIGTERM stops the
    worker within shutdown_timeout_ms, non-zero, with one line saying how many results could
    not be committed and that they will be recovered; a restart recovers them at once."""
    shutdown_timeout_s = 2.0
    duplex = fault_dir(
        tmp_path / "work",
        migrated,
        worker={
            "max_concurrent_handlers": 4,
            "prefetch": 0,
            "shutdown_timeout_ms": int(shutdown_timeout_s * 1000),
        },
        database={"busy_timeout_ms": 200},
    )
    specs = [StepSpec(f"s{i:02d}", (), 0.0, 3) for i in range(12)]
    # The handlers wait at this gate: four are running, and none can end, until the test
    # holds the database's lock. (No timing: the held results are exactly those four.)
    gate = tmp_path / "gate"
    task = duplex.submit(write_template(tmp_path / "locked.toml", "e2e_locked", specs, gate=gate))
    done_log = Path(duplex.env[DONE_LOG_ENV])

    worker = duplex.start("run")
    lock = sqlite3.connect(duplex.db_path, timeout=10, isolation_level=None)
    try:
        wait_for(
            lambda: len(started(duplex)) >= 4 or worker.poll() is not None,
            "four handlers to start",
        )
        assert worker.poll() is None, duplex.stderr_text()
        # Another process takes the database's write lock: from now on every commit fails.
        lock.execute("BEGIN EXCLUSIVE")
        held = {
            (step_uuid, attempts)
            for step_uuid, attempts in lock.execute(
                "SELECT step_uuid, attempts FROM workflow_steps WHERE state = 'in_progress'"
            )
        }
        assert held == set(started(duplex)), held
        assert len(held) == 4, held
        # Let the running handlers finish: their results are now held, uncommittable.
        gate.touch()
        wait_for(
            lambda: held <= set(read_log(done_log)) or worker.poll() is not None,
            "the running handlers to finish",
        )
        assert worker.poll() is None, duplex.stderr_text()
        wait_for(lambda: "commit of" in duplex.stderr_text(), "a commit to fail")
        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        returncode = worker.wait(timeout=shutdown_timeout_s + 20)
        took = time.monotonic() - signalled
        # Still locked: nothing of it was committed behind our back.
        still = set(
            lock.execute(
                "SELECT step_uuid, attempts FROM workflow_steps WHERE state = 'in_progress'"
            )
        )
        assert still == held
    finally:
        gate.touch()
        kill_and_reap(worker)
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
    stderr = duplex.stderr_text()
    print(f"exited {took:.2f}s after SIGTERM with {len(held)} result(s) held")
    assert returncode != 0, stderr
    assert took < shutdown_timeout_s + 6, stderr
    assert "SIGTERM received" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    line = the_error_line(stderr)
    assert f"{len(held)} result(s) could not be committed" in line, line
    assert "recovered" in line, line
    assert claimed_attempts(duplex, task) == held

    since = datetime.now(UTC)
    restart = run_bounded(duplex, "run", "--until-idle", timeout=RUN_TIMEOUT_S)
    assert restart.returncode == 0, restart.stderr
    assert "Traceback" not in restart.stderr, restart.stderr
    recovered_in = first_worker_lost_after(duplex, task, since)
    assert recovered_in is not None, restart.stderr
    print(f"restart recovered the held attempts {recovered_in:.2f}s after it started")
    assert recovered_in < RECOVERY_BOUND_S
    rows = step_rows(duplex, task)
    assert {row["state"] for row in rows.values()} == {"complete"}, rows
    history = assert_history(duplex, task)
    assert history.with_reason("worker_lost") == held
    per_step = assert_runs(duplex, task, history)
    for step_uuid, attempt in held:
        assert per_step[step_uuid] == 2
        assert history.outcomes[step_uuid, attempt + 1] == ("complete", "succeeded")


# --- 4. settings that contradict each other ---------------------------------------------------


@pytest.mark.parametrize("where", ["file", "env"])
def test_heartbeat_longer_than_a_third_of_the_claim_timeout(tmp_path: Path, where: str) -> None:
    """A heartbeat of 5 s with a liveness timeout of 2 s would get a live worker presumed
    dead: ``duplex run`` refuses to start, with one line naming both keys."""
    duplex = fault_dir(
        tmp_path / "work",
        None,
        worker={"heartbeat_interval_s": 5},
        event_system={"claim_timeout_s": 2} if where == "file" else {},
    )
    env = {"DUPLEX_EVENT_SYSTEM__CLAIM_TIMEOUT_S": "2"} if where == "env" else {}
    result = duplex.run("run", "--until-idle", env=env, script=where == "file", timeout=30)
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("duplex: error:"), lines
    assert "worker.heartbeat_interval_s" in lines[0], lines
    assert "event_system.claim_timeout_s" in lines[0], lines
    assert not duplex.db_path.exists()  # refused before touching the database
