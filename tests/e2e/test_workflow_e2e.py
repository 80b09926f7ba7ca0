"""Workflows end to end through the CLI: every command is a ``python -m duplex`` subprocess.

Each test works in its own ``tmp_path``: ``settings.toml`` there points at a SQLite file
there and at ``tests/workflow_handlers``, which the subprocess imports through
``PYTHONPATH=<repo root>``. Handlers append ``<step> <attempt>`` to ``$WF_RUN_LOG`` as they
start, so a test sees which steps really ran, how often and in which order. Assertions are on
states, counts and orderings, never on timings.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests import processes
from tests.conftest import sqlite_database

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_S = 60.0
WAIT_S = 30.0

SETTINGS = """
[database]
url = "sqlite:///{db}"

[worker]
handler_modules = ["tests.workflow_handlers.handlers"]
max_concurrent_handlers = 4
heartbeat_interval_s = 0.2

[event_system]
polling_interval_ms = 50

[retry]
backoff_base_ms = 50
jitter = 0.0

[logging]
level = "WARNING"

[templates]
directory = "templates"
"""

DIAMOND = """
name = "diamond"
[[steps]]
name = "d"
handler = "wf.echo"
depends_on = ["b", "c"]
[[steps]]
name = "b"
handler = "wf.echo"
depends_on = ["a"]
[[steps]]
name = "c"
handler = "wf.echo"
depends_on = ["a"]
[[steps]]
name = "a"
handler = "wf.echo"
"""

# a -> b (fails) -> d -> e; a -> c. c completes, b fails, d and e never run.
FAILING_BRANCH = """
name = "failing_branch"
[[steps]]
name = "a"
handler = "wf.echo"
[[steps]]
name = "b"
handler = "wf.fail"
depends_on = ["a"]
[[steps]]
name = "c"
handler = "wf.echo"
depends_on = ["a"]
[[steps]]
name = "d"
handler = "wf.echo"
depends_on = ["b"]
[[steps]]
name = "e"
handler = "wf.echo"
depends_on = ["d", "c"]
"""

# a -> b -> c, where b fails on its first (and only allowed) attempt.
FLAKY_CHAIN = """
name = "flaky_chain"
[[steps]]
name = "a"
handler = "wf.echo"
[[steps]]
name = "b"
handler = "{b_handler}"
depends_on = ["a"]
max_attempts = 1
[[steps]]
name = "c"
handler = "wf.echo"
depends_on = ["b"]
"""

# Two gated roots run at once; each has a child. ok_root succeeds, retry_root fails retryably.
GATED = """
name = "gated"
[[steps]]
name = "ok_root"
handler = "wf.gate"
[[steps]]
name = "retry_root"
handler = "wf.gate"
inputs = { outcome = "retryable" }
max_attempts = 5
[[steps]]
name = "ok_child"
handler = "wf.echo"
depends_on = ["ok_root"]
[[steps]]
name = "retry_child"
handler = "wf.echo"
depends_on = ["retry_root"]
"""


class Cli:
    """Runs ``python -m duplex`` in a working directory of its own."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.db_path = cwd / "wf.db"
        self.run_log = cwd / "runs.log"
        (cwd / "settings.toml").write_text(SETTINGS.format(db=self.db_path))
        (cwd / "templates").mkdir()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "WF_RUN_LOG": str(self.run_log),
        }
        for key in list(self.env):
            if key.startswith("DUPLEX_"):
                del self.env[key]

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "duplex", *args]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return processes.run(
            self.command(*args), cwd=self.cwd, env=self.env, text=True, timeout=COMMAND_TIMEOUT_S
        )

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.run(*args)
        assert result.returncode == 0, describe(result)
        assert "Traceback" not in result.stderr, describe(result)
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Start a command, owned by the running test (stopped at its teardown)."""
        return processes.current().popen(
            self.command(*args),
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def template(self, name: str, text: str) -> Path:
        path = self.cwd / "templates" / f"{name}.toml"
        path.write_text(text)
        return path

    def submit(self, template: Path | str, context: dict[str, Any] | None = None) -> str:
        args = ["submit", str(template)]
        if context is not None:
            args += ["--context", json.dumps(context)]
        return self.ok(*args).stdout.strip().splitlines()[-1]

    def status(self, task: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.ok("status", task, "--json").stdout)
        return data

    def steps(self, task: str) -> dict[str, dict[str, Any]]:
        """Read the task's steps straight from the database (cheaper than a subprocess)."""
        with sqlite3.connect(self.db_path) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(
                "SELECT * FROM workflow_steps WHERE task_uuid = ? ORDER BY position", (task,)
            )
            return {row["name"]: dict(row) for row in rows}

    def task_state(self, task: str) -> str:
        ((state,),) = self.sql("SELECT state FROM tasks WHERE task_uuid = ?", (task,))
        return str(state)

    def runs(self) -> list[tuple[str, int]]:
        if not self.run_log.exists():
            return []
        lines = self.run_log.read_text().split()
        return [(lines[i], int(lines[i + 1])) for i in range(0, len(lines), 2)]

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db_path) as conn:
            return list(conn.execute(query, params))


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Assert: non-zero exit, no traceback, one stderr line naming the problem, no stdout."""
    assert result.returncode != 0, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, describe(result)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == "", describe(result)
    return lines[0]


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """A working directory with a migrated database (migrated in-process: ``duplex migrate``
    has its own end-to-end test, and every subprocess here costs a second of start-up)."""
    cli = Cli(tmp_path)
    sqlite_database(cli.db_path).dispose()
    return cli


def transitions_of(cli: Cli, task: str) -> list[tuple[str, str | None, str, str | None, str]]:
    return [
        (name, from_state, to_state, worker_id, reason)
        for name, from_state, to_state, worker_id, reason in cli.sql(
            "SELECT s.name, t.from_state, t.to_state, t.worker_id, t.reason "
            "FROM workflow_step_transitions t JOIN workflow_steps s USING (step_uuid) "
            "WHERE s.task_uuid = ? ORDER BY t.id",
            (task,),
        )
    ]


# --- workflows ----------------------------------------------------------------------------


def test_diamond(cli: Cli) -> None:
    # Submitted by name from the templates directory (the file has another name).
    cli.template("diamond_file", DIAMOND)
    task = cli.submit("diamond")
    assert {n: s["state"] for n, s in cli.steps(task).items()} == {
        "a": "enqueued",
        "b": "pending",
        "c": "pending",
        "d": "pending",
    }

    cli.ok("run", "--until-idle")

    status = cli.status(task)
    assert (status["state"], status["execution_status"]) == ("complete", "all_complete")
    steps = {s["name"]: s for s in status["steps"]}
    assert list(steps) == ["a", "b", "c", "d"]  # dependency order, not template order
    assert all(s["state"] == "complete" and s["attempts"] == 1 for s in steps.values())
    # d saw both parents' results; each parent saw a's.
    assert sorted(steps["d"]["results"]["parents"]) == ["b", "c"]
    assert steps["b"]["results"]["parents"]["a"]["step"] == "a"

    runs = [name for name, _ in cli.runs()]
    assert Counter(runs) == dict.fromkeys("abcd", 1)
    assert (runs[0], runs[-1]) == ("a", "d")
    # d was enqueued only once both b and c had completed.
    moves = transitions_of(cli, task)
    d_ready = moves.index(("d", "pending", "enqueued", None, "dependencies complete"))
    for parent in "bc":
        done = next(i for i, m in enumerate(moves) if m[0] == parent and m[2] == "complete")
        assert done < d_ready

    table = cli.ok("status", task).stdout
    for fragment in ("all_complete", "STEP", "STATE", "ATTEMPTS", "DURATION", "ERROR"):
        assert fragment in table


def test_failing_branch(cli: Cli) -> None:
    task = cli.submit(cli.template("failing_branch", FAILING_BRANCH))
    cli.ok("run", "--until-idle")

    status = cli.status(task)
    assert (status["state"], status["execution_status"]) == ("error", "blocked_by_failures")
    steps = {s["name"]: s for s in status["steps"]}
    assert {n: s["state"] for n, s in steps.items()} == {
        "a": "complete",
        "b": "error",
        "c": "complete",
        "d": "pending",
        "e": "pending",
    }
    assert (steps["b"]["error_type"], steps["b"]["attempts"]) == ("permanent_error", 1)
    # Dependents of the failed step never ran.
    assert Counter(name for name, _ in cli.runs()) == {"a": 1, "b": 1, "c": 1}
    table = cli.ok("status").stdout  # the task list shows the execution status too
    assert task in table
    assert "blocked_by_failures" in table


def test_cancel_before_anything_ran(cli: Cli) -> None:
    task = cli.submit(cli.template("diamond", DIAMOND))
    result = cli.ok("cancel", task, "--reason", "wrong order")
    assert "4 step(s) cancelled" in result.stdout

    assert cli.task_state(task) == "cancelled"
    assert {s["state"] for s in cli.steps(task).values()} == {"cancelled"}
    cancelled = [m for m in transitions_of(cli, task) if m[2] == "cancelled"]
    assert len(cancelled) == 4
    for _, _, _, worker_id, reason in cancelled:
        assert worker_id is not None
        assert worker_id.startswith("operator:")
        assert reason == "cancelled by operator: wrong order"

    # Cancelling again is impossible, and writes nothing.
    before = cli.sql("SELECT COUNT(*) FROM workflow_step_transitions")
    one_line_error(cli.run("cancel", task), "already cancelled", task)
    assert cli.sql("SELECT COUNT(*) FROM workflow_step_transitions") == before


def test_cancel_stops_running_steps_and_nothing_runs_after(cli: Cli) -> None:
    gate_dir = cli.cwd / "gate"
    gate_dir.mkdir()
    task = cli.submit(cli.template("gated", GATED), {"gate_dir": str(gate_dir)})
    worker = cli.popen("run", "--until-idle")
    try:
        wait_for(
            lambda: all((gate_dir / f"{n}.started").exists() for n in ("ok_root", "retry_root")),
            "both gated roots to start",
        )
        result = cli.ok("cancel", task)
        assert "2 step(s) cancelled" in result.stdout
        assert "2 running attempt(s) asked to stop" in result.stdout
        # The gate stays shut: the worker's sweep sets ctx.cancelled, which opens it.
        _, err = worker.communicate(timeout=COMMAND_TIMEOUT_S)
        assert worker.returncode == 0, err
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()

    steps = cli.steps(task)
    assert {n: s["state"] for n, s in steps.items()} == dict.fromkeys(
        ("ok_root", "retry_root", "ok_child", "retry_child"), "cancelled"
    )
    for root in ("ok_root", "retry_root"):
        assert json.loads(steps[root]["error"])["error_type"] == "cancelled"
        assert steps[root]["next_attempt_at"] is None
    # Nothing ran after the cancel: no child, no retry.
    assert Counter(cli.runs()) == {("ok_root", 1): 1, ("retry_root", 1): 1}
    assert cli.task_state(task) == "cancelled"


def test_retry_then_run_completes_the_task(cli: Cli) -> None:
    task = cli.submit(cli.template("flaky", FLAKY_CHAIN.format(b_handler="wf.fail_first")))
    cli.ok("run", "--until-idle")
    steps = cli.steps(task)
    assert cli.task_state(task) == "error"
    assert (steps["b"]["state"], steps["c"]["state"]) == ("error", "pending")

    # Only a step in error can be retried; the refusal is one line and writes nothing.
    before = cli.sql("SELECT COUNT(*) FROM workflow_step_transitions")
    one_line_error(cli.run("retry", steps["a"]["step_uuid"]), "complete", "only a step in error")
    assert cli.sql("SELECT COUNT(*) FROM workflow_step_transitions") == before

    result = cli.ok("retry", steps["b"]["step_uuid"], "--reason", "bug fixed")
    assert "one more attempt" in result.stdout
    assert "is in_progress" in result.stdout
    b = cli.steps(task)["b"]
    assert (b["state"], b["attempts"], b["max_attempts"]) == ("enqueued", 1, 2)
    (_, from_state, to_state, worker_id, reason) = transitions_of(cli, task)[-1]
    assert (from_state, to_state) == ("error", "enqueued")
    assert worker_id is not None
    assert worker_id.startswith("operator:")
    assert reason.startswith("retried by operator: bug fixed")

    cli.ok("run", "--until-idle")
    status = cli.status(task)
    assert (status["state"], status["execution_status"]) == ("complete", "all_complete")
    assert cli.runs() == [("a", 1), ("b", 1), ("b", 2), ("c", 1)]


def test_resolve_lets_the_dependents_run(cli: Cli) -> None:
    task = cli.submit(cli.template("stuck", FLAKY_CHAIN.format(b_handler="wf.fail")))
    cli.ok("run", "--until-idle")
    b_uuid = cli.steps(task)["b"]["step_uuid"]

    result = cli.ok("resolve", b_uuid, "--reason", "done by hand")
    assert "enqueued c" in result.stdout
    steps = cli.steps(task)
    assert (steps["b"]["state"], steps["c"]["state"]) == ("resolved_manually", "enqueued")
    one_line_error(cli.run("resolve", b_uuid), "resolved_manually")

    cli.ok("run", "--until-idle")
    status = cli.status(task)
    assert (status["state"], status["execution_status"]) == ("complete", "all_complete")
    c = {s["name"]: s for s in status["steps"]}["c"]
    assert c["results"]["parents"] == {"b": {}}
    assert cli.runs() == [("a", 1), ("b", 1), ("c", 1)]


def test_operator_commands_reject_unknown_ids(cli: Cli) -> None:
    unknown = "6f1c1a52-3b8e-4f3e-9a52-0d8c4f1e2b77"
    one_line_error(cli.run("cancel", unknown), f"unknown task: {unknown}")
    one_line_error(cli.run("resolve", "not-a-uuid"), "unknown step: not-a-uuid")


# --- invalid templates --------------------------------------------------------------------

STEP = '[[steps]]\nname = "{name}"\nhandler = "wf.echo"\n'


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        pytest.param(
            STEP.format(name="a")
            + 'depends_on = ["c"]\n'
            + STEP.format(name="b")
            + 'depends_on = ["a"]\n'
            + STEP.format(name="c")
            + 'depends_on = ["b"]\n',
            ["cycle", "a -> b -> c -> a"],
            id="cycle",
        ),
        pytest.param(
            STEP.format(name="a") + 'depends_on = ["ghost"]\n',
            ["unknown step 'ghost'"],
            id="unknown-dependency",
        ),
        pytest.param(
            STEP.format(name="a") + STEP.format(name="a"),
            ["duplicate step name 'a'"],
            id="duplicate-step",
        ),
        pytest.param(
            STEP.format(name="a") + "retries = 3\n",
            ["unknown field", "retries"],
            id="unknown-field",
        ),
        pytest.param(
            STEP.format(name="a") + "max_attempts = 0\n", ["max_attempts"], id="bad-value"
        ),
    ],
)
def test_invalid_templates_are_rejected_with_nothing_written(
    cli: Cli, body: str, fragments: list[str]
) -> None:
    path = cli.template("invalid", 'name = "invalid"\n' + body)
    one_line_error(cli.run("submit", str(path)), str(path), *fragments)
    for table in ("tasks", "workflow_steps", "workflow_step_edges", "workflow_step_transitions"):
        assert cli.sql(f"SELECT COUNT(*) FROM {table}") == [(0,)], table


# --- status --watch -----------------------------------------------------------------------


def test_watch_follows_a_task_until_it_finishes(cli: Cli) -> None:
    gate_dir = cli.cwd / "gate"
    gate_dir.mkdir()
    template = cli.template("gated", GATED.replace('"retryable"', '"ok"'))
    task = cli.submit(template, {"gate_dir": str(gate_dir)})
    watch = cli.popen("status", task, "--watch", "--json", "--interval", "0.1")
    watchdog = threading.Timer(WAIT_S, watch.kill)
    watchdog.start()
    worker = None
    try:
        assert watch.stdout is not None
        assert watch.stderr is not None
        # The first snapshot comes before any worker runs, so it shows the task pending.
        snapshots: list[dict[str, Any]] = [json.loads(watch.stdout.readline())]
        worker = cli.popen("run", "--until-idle")
        # Read snapshots until one shows the gated steps running, then let them finish.
        while not snapshots or not any(s["state"] == "in_progress" for s in snapshots[-1]["steps"]):
            line = watch.stdout.readline()
            assert line, "the watch ended before showing a running step"
            snapshots.append(json.loads(line))
        (gate_dir / "release").touch()
        snapshots += [json.loads(line) for line in watch.stdout.read().splitlines()]
        err = watch.stderr.read()
        watch.wait()
        worker.communicate(timeout=COMMAND_TIMEOUT_S)
    finally:
        watchdog.cancel()
        for process in (watch, worker):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert watch.returncode == 0, err
    assert "Traceback" not in err
    # One JSON object per change, ending with the finished task.
    assert snapshots[0]["state"] == "pending"
    assert snapshots[-1]["state"] == "complete"
    assert snapshots[-1]["execution_status"] == "all_complete"
    assert all(snap["task_uuid"] == task for snap in snapshots)
    assert len({json.dumps(snap["steps"]) for snap in snapshots}) == len(snapshots)

    # A finished task: one snapshot, exit 0 at once. The human form shows the step table.
    table = cli.ok("status", task, "--watch").stdout
    assert "all_complete" in table
    assert "ok_child" in table


def test_watch_stops_cleanly_on_ctrl_c(cli: Cli) -> None:
    task = cli.submit(cli.template("diamond", DIAMOND))  # no worker: it never finishes
    watch = cli.popen("status", task, "--watch", "--interval", "0.1")
    watchdog = threading.Timer(WAIT_S, watch.kill)
    watchdog.start()
    try:
        assert watch.stdout is not None
        assert watch.stderr is not None
        first = watch.stdout.readline()  # the first snapshot is on screen
        assert task in first
        watch.send_signal(signal.SIGINT)
        watch.stdout.read()
        err = watch.stderr.read()
        watch.wait()
    finally:
        watchdog.cancel()
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines() == ["duplex: stopped watching (task is pending)"]


def test_watch_needs_a_task(cli: Cli) -> None:
    one_line_error(cli.run("status", "--watch"), "TASK_UUID")
