"""Local wake-ups end to end: a real ``duplex run`` on a SQLite file that polls once a minute.

The worker polls every 60 s, so only a wake-up can explain a claim within seconds of a
submission made in this process with the ``Client``, or of a ``duplex retry`` run as a command.
The bound (2 s) is generous: this checks that the wake-up happens, it measures nothing.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from duplex import Client
from tests import processes
from tests.conftest import sqlite_database

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT_S = 2.0  # without the wake-up: up to 60 s
START_S = 60.0
COMMAND_TIMEOUT_S = 60.0

SETTINGS = """
[database]
url = "sqlite:///{db}"

[worker]
handler_modules = ["tests.workflow_handlers.handlers"]

[event_system]
polling_interval_ms = 60000

[logging]
level = "WARNING"
"""

ONE_STEP = """
name = "one_step"
[[steps]]
name = "a"
handler = "wf.echo"
"""

FAILS_ONCE = """
name = "fails_once"
[[steps]]
name = "a"
handler = "wf.fail_first"
"""


class Host:
    """A working directory with its SQLite file, and the commands run there."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.db_path = cwd / "wake.db"
        (cwd / "settings.toml").write_text(SETTINGS.format(db=self.db_path))
        sqlite_database(self.db_path).dispose()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEX_")}
        self.env["PYTHONPATH"] = str(REPO_ROOT)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Start a command, owned by the running test (stopped at its teardown)."""
        return processes.current().popen(
            [sys.executable, "-m", "duplex", *args],
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ok(self, *args: str) -> str:
        result = processes.run(
            [sys.executable, "-m", "duplex", *args],
            cwd=self.cwd,
            env=self.env,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        assert result.returncode == 0, result.stderr
        return str(result.stdout)

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db_path) as conn:
            return list(conn.execute(query, params))

    def claims(self, task_uuid: str) -> list[int]:
        """The attempts of the task's steps claimed so far (one per claim)."""
        rows = self.sql(
            "SELECT t.attempt FROM workflow_step_transitions t "
            "JOIN workflow_steps s USING (step_uuid) "
            "WHERE s.task_uuid = ? AND t.to_state = 'in_progress' ORDER BY t.attempt",
            (task_uuid,),
        )
        return [attempt for (attempt,) in rows]


def wait_for(what: str, condition: Any, timeout_s: float, worker: subprocess.Popen[str]) -> None:
    """Wait until ``condition()`` holds (read every 10 ms), while the worker runs."""
    start = time.monotonic()
    while not condition():
        if worker.poll() is not None:
            _, err = worker.communicate()
            raise AssertionError(f"the worker exited ({worker.returncode}) before {what}:\n{err}")
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"no {what} within {timeout_s:g}s")
        time.sleep(0.01)


def test_a_submission_and_a_retry_wake_the_idle_worker_at_once(tmp_path: Path) -> None:
    host = Host(tmp_path)
    worker = host.popen("run")
    # Idle and reachable: its address is recorded once its intake has begun (and looked).
    wait_for(
        "recorded wake address",
        lambda: host.sql("SELECT wake_address FROM workers WHERE wake_address IS NOT NULL"),
        START_S,
        worker,
    )

    with Client(f"sqlite:///{host.db_path}") as client:
        template = tmp_path / "one_step.toml"
        template.write_text(ONE_STEP)
        submitted = time.monotonic()
        task_uuid = client.submit(template, {})
    wait_for("claim after the submission", lambda: host.claims(task_uuid), 10, worker)
    took = time.monotonic() - submitted
    assert took < PROMPT_S, f"first claim {took:.2f}s after the submission began"

    # A retry by an operator command: the step fails on its first attempt, then `duplex retry`.
    fails_once = tmp_path / "fails_once.toml"
    fails_once.write_text(FAILS_ONCE)
    with Client(f"sqlite:///{host.db_path}") as client:
        failing = client.submit(fails_once, {})
    wait_for(
        "the first attempt's failure",
        lambda: host.sql(
            "SELECT 1 FROM workflow_steps WHERE task_uuid = ? AND state = 'error'", (failing,)
        ),
        10,
        worker,
    )
    ((step_uuid,),) = host.sql(
        "SELECT step_uuid FROM workflow_steps WHERE task_uuid = ?", (failing,)
    )
    host.ok("retry", step_uuid)
    retried = time.monotonic()
    wait_for("claim after the retry", lambda: host.claims(failing) == [1, 2], 10, worker)
    took = time.monotonic() - retried
    assert took < PROMPT_S, f"second attempt claimed {took:.2f}s after `duplex retry` returned"
