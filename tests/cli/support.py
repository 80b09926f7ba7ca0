"""Driving the ``duplex`` CLI in subprocesses: a working directory and the ways to use it.

``make_duplex`` writes a ``settings.toml`` that points at a SQLite file in the directory and at
the handlers in ``tests/e2e_handlers``, which the subprocess imports through
``PYTHONPATH=<repo root>``. Handlers append ``<step_uuid> <attempt>`` to ``$E2E_RUN_LOG`` as
they start, so a test can tell how often each step's handler really ran. Long-lived commands
belong to the running test (``tests/processes.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import processes

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = REPO_ROOT / "tests" / "e2e_templates"
HANDLER_MODULE = "tests.e2e_handlers.handlers"
RUN_LOG_ENV = "E2E_RUN_LOG"

# Upper bound for any one CLI call; a hang fails the test instead of stalling the suite.
COMMAND_TIMEOUT_S = 60.0
# Upper bound for waiting on a condition polled from the database or a log file.
WAIT_S = 30.0

ORDER_CONTEXT = {
    "order": {"id": "A-1001", "items": [{"sku": "BOOK-1", "qty": 2}], "total": 42.5},
}


def _settings_toml(
    db_path: Path,
    *,
    handler_modules: Sequence[str] = (HANDLER_MODULE,),
    templates_dir: Path = TEMPLATES,
    worker: dict[str, Any] | None = None,
) -> str:
    worker_cfg: dict[str, Any] = {
        "namespaces": ["default"],
        "handler_modules": list(handler_modules),
        "max_concurrent_handlers": 8,
        "prefetch": 4,
        "handler_timeout_ms": 30000,
        "shutdown_timeout_ms": 10000,
        **(worker or {}),
    }
    lines = [
        "[database]",
        f"url = {json.dumps(f'sqlite:///{db_path}')}",
        "",
        "[worker]",
        *(f"{key} = {json.dumps(value)}" for key, value in worker_cfg.items()),
        "",
        "[event_system]",
        'deployment_mode = "polling"',
        "polling_interval_ms = 50",
        "",
        "[retry]",
        "backoff_base_ms = 100",
        "jitter = 0.0",
        "",
        "[logging]",
        'level = "INFO"',
        "",
        "[templates]",
        f"directory = {json.dumps(str(templates_dir))}",
        "",
    ]
    return "\n".join(lines)


def duplex_script() -> Path:
    """Return the ``duplex`` console script of the interpreter running the tests."""
    beside = Path(sys.executable).parent / "duplex"
    if beside.is_file():
        return beside
    found = shutil.which("duplex")
    assert found, "the duplex console script is not installed next to sys.executable"
    return Path(found)


@dataclass
class Duplex:
    """A working directory with settings, a database and a run log, and ways to drive it."""

    cwd: Path
    db_path: Path
    run_log: Path
    env: dict[str, str]

    def command(self, args: Sequence[str], *, script: bool = False) -> list[str]:
        prefix = [str(duplex_script())] if script else [sys.executable, "-m", "duplex"]
        return [*prefix, *args]

    def run(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        script: bool = False,
        timeout: float = COMMAND_TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        return processes.run(
            self.command(args, script=script),
            cwd=self.cwd,
            env={**self.env, **(env or {})},
            text=True,
            timeout=timeout,
        )

    def ok(self, *args: str, script: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a command that must succeed; show its output when it does not."""
        result = self.run(*args, script=script)
        assert result.returncode == 0, _describe(result)
        assert "Traceback" not in result.stderr, _describe(result)
        return result

    def submit(self, template: str | Path, context: dict[str, Any] | None = None) -> str:
        args = ["submit", str(template)]
        if context is not None:
            args += ["--context", json.dumps(context)]
        result = self.ok(*args)
        last = result.stdout.splitlines()[-1]
        assert str(uuid.UUID(last)) == last, f"last stdout line is not a UUID alone: {last!r}"
        return last

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a long-lived command with its output going to files (no pipe to fill up).

        The running test owns it (``tests/processes.py``): it is stopped at the test's
        teardown if still running, whether the test passed or failed.
        """
        self.stdout_path.unlink(missing_ok=True)
        self.stderr_path.unlink(missing_ok=True)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            return processes.current().popen(
                self.command(args),
                cwd=self.cwd,
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=err,
            )

    @property
    def stdout_path(self) -> Path:
        return self.cwd / "worker.stdout"

    @property
    def stderr_path(self) -> Path:
        return self.cwd / "worker.stderr"

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def sql(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.db_path, timeout=10)
        try:
            return conn.execute(query, params).fetchall()
        finally:
            conn.close()

    def step_states(self, task_uuid: str) -> dict[str, tuple[str, int]]:
        """Return ``name -> (state, attempts)`` for a task's steps."""
        rows = self.sql(
            "SELECT name, state, attempts FROM workflow_steps WHERE task_uuid = ?", [task_uuid]
        )
        return {name: (state, attempts) for name, state, attempts in rows}

    def runs(self) -> Counter[str]:
        """Return how many times each step's handler started, from the run log."""
        if not self.run_log.exists():
            return Counter()
        return Counter(line.split()[0] for line in self.run_log.read_text().splitlines() if line)


def _describe(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit {result.returncode}: {result.args}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def make_duplex(
    directory: Path,
    *,
    handler_modules: Sequence[str] = (HANDLER_MODULE,),
    templates_dir: Path = TEMPLATES,
    worker: dict[str, Any] | None = None,
) -> Duplex:
    directory.mkdir(parents=True, exist_ok=True)
    db_path = directory / "duplex.db"
    (directory / "settings.toml").write_text(
        _settings_toml(
            db_path, handler_modules=handler_modules, templates_dir=templates_dir, worker=worker
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEX_")}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        PYTHONUNBUFFERED="1",
        **{RUN_LOG_ENV: str(directory / "runs.log")},
    )
    return Duplex(cwd=directory, db_path=db_path, run_log=directory / "runs.log", env=env)


def migrated_file(duplex: Duplex) -> Path:
    """Run `duplex migrate` and return the database file, whole: tests copy it."""
    duplex.ok("migrate")
    # Fold the WAL into the main file so that copying the one file copies everything.
    conn = sqlite3.connect(duplex.db_path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return duplex.db_path


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Assert: non-zero exit, no traceback, exactly one non-empty stderr line naming the problem."""
    assert result.returncode != 0, _describe(result)
    assert "Traceback" not in result.stderr, _describe(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, _describe(result)
    line = lines[0].strip()
    assert line, _describe(result)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line
