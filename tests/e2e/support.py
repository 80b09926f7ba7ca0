"""PostgreSQL workers as real ``duplex run`` subprocesses, for the fault tests of ``tests/e2e``.

A ``Cluster`` is a schema of its own, a working directory with a ``settings.toml``, and the
worker processes running there (owned by the running test, ``tests/processes.py``); the
handlers (``tests/e2e_handlers/kills.py``) append ``<step_uuid> <attempt> <pid>`` to its run
log as they start. The ``assert_each_attempt_*`` checks read the transition rows and that log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from duplex.clock import utcnow
from duplex.storage.db import Database
from duplex.storage.listen import libpq_url
from duplex.storage.submission import create_task
from duplex.templates import parse_template
from tests import processes
from tests.conftest import postgres_schema_url

WAIT_S = 30.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Step:
    name: str
    ms: int
    max_attempts: int = 3
    depends_on: tuple[str, ...] = ()
    handler: str = "kills.sleep"


def template_toml(name: str, steps: Sequence[Step], namespace: str = "default") -> str:
    lines = [f'name = "{name}"', f'namespace = "{namespace}"', ""]
    for step in steps:
        lines += [
            "[[steps]]",
            f'name = "{step.name}"',
            f'handler = "{step.handler}"',
            f"max_attempts = {step.max_attempts}",
            f"inputs = {{ ms = {step.ms} }}",
        ]
        if step.depends_on:
            lines.append(f"depends_on = {json.dumps(list(step.depends_on))}")
        lines.append("")
    return "\n".join(lines)


def settings_toml(url: str, sections: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join([f"[database]\nurl = {json.dumps(url)}\n", *lines])


@dataclass
class WorkerProcess:
    name: str
    popen: subprocess.Popen[bytes]
    stderr_path: Path
    worker_id: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (a drain), then wait for the exit code."""
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            # A stopped process gets SIGKILL too, but resume it so that nothing lingers.
            os.kill(self.pid, signal.SIGCONT)
            self.popen.kill()
        self.popen.wait(timeout=10)


@dataclass
class Cluster:
    """A schema, a working directory with settings, and the worker processes running there."""

    directory: Path
    schema: str
    url: str
    app_name: str
    env: dict[str, str]
    db: Database
    sql_conn: psycopg.Connection[Any]
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def run_log(self) -> Path:
        return self.directory / "runs.log"

    def conninfo(self, application_name: str) -> str:
        """A libpq URL for this schema, under another application_name."""
        return libpq_url(postgres_schema_url(self.schema)) + f"&application_name={application_name}"

    def start_worker(self, name: str, env: dict[str, str] | None = None) -> WorkerProcess:
        stderr_path = self.directory / f"{name}.stderr"
        with open(self.directory / f"{name}.stdout", "wb") as out, open(stderr_path, "wb") as err:
            popen = processes.current().popen(
                [sys.executable, "-m", "duplex", "run"],
                cwd=self.directory,
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=err,
            )
        worker = WorkerProcess(name, popen, stderr_path)
        self.workers.append(worker)
        return worker

    def wait_started(self, *workers: WorkerProcess) -> None:
        for worker in workers:

            def started(w: WorkerProcess = worker) -> bool:
                assert w.alive(), f"{w.name} exited early:\n{w.stderr()}"
                return " started: " in w.stderr()

            wait_for(started, f"worker {worker.name} to start", timeout=60)
            (row,) = self.sql("SELECT worker_id FROM workers WHERE pid = %s", [worker.pid])
            worker.worker_id = row[0]

    def sql(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.sql_conn.execute(query, params).fetchall()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Every ``sql`` read inside sees the database as of one moment."""
        with self.sql_conn.transaction():
            self.sql_conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield

    def submit(self, name: str, steps: Sequence[Step], namespace: str = "default") -> str:
        template = parse_template(template_toml(name, steps, namespace))
        with self.db.write() as conn:
            return create_task(conn, template, {}, now=utcnow())

    def open_work(self) -> int:
        (row,) = self.sql(
            "SELECT COUNT(*) FROM workflow_steps "
            "WHERE state IN ('enqueued', 'in_progress', 'waiting_for_retry')"
        )
        return int(row[0])

    @property
    def hold(self) -> Path:
        """While this file exists, handlers that start wait (``kills.py``)."""
        return self.directory / "hold"

    def runs(self, log: Path | None = None) -> list[tuple[str, int, int]]:
        """Return the run log (or the held log): (step_uuid, attempt, pid) per handler start."""
        log = log or self.run_log
        if not log.exists():
            return []
        rows = []
        for line in log.read_text().splitlines():
            step_uuid, attempt, pid = line.split()
            rows.append((step_uuid, int(attempt), int(pid)))
        return rows

    def held(self) -> list[tuple[str, int, int]]:
        """The handler starts held by ``hold``: (step_uuid, attempt, pid)."""
        return self.runs(self.directory / "held.log")

    def claims_of(self, worker: WorkerProcess) -> list[tuple[str, int]]:
        """Return (step_uuid, attempt) of the attempts ``worker`` holds in progress now."""
        rows = self.sql(
            "SELECT step_uuid, attempts FROM workflow_steps "
            "WHERE state = 'in_progress' AND claimed_by = %s",
            [worker.worker_id],
        )
        return [(s, int(a)) for s, a in rows]

    def transitions(self) -> list[tuple[str, str | None, str, int, str | None, str | None, Any]]:
        return self.sql(
            "SELECT step_uuid, from_state, to_state, attempt, worker_id, reason, created_at "
            "FROM workflow_step_transitions ORDER BY id"
        )

    def lost_rows(self) -> list[tuple[str, int, str, datetime]]:
        """Return (step_uuid, attempt, worker_id, created_at) of worker_lost settlements."""
        return self.sql(
            "SELECT step_uuid, attempt, worker_id, created_at FROM workflow_step_transitions "
            "WHERE from_state = 'in_progress' AND reason = 'worker_lost' ORDER BY id"
        )


def settlements(cluster: Cluster) -> dict[tuple[str, int], list[tuple[str, str | None, str]]]:
    """(step, attempt) -> [(to_state, reason, worker_id)] of each move out of in_progress."""
    settled: dict[tuple[str, int], list[tuple[str, str | None, str]]] = defaultdict(list)
    for step_uuid, from_state, to_state, attempt, worker_id, reason, _ in cluster.transitions():
        if from_state == "in_progress":
            settled[step_uuid, attempt].append((to_state, reason, worker_id or ""))
    return settled


def claims(cluster: Cluster) -> dict[tuple[str, int], list[str]]:
    """(step, attempt) -> [worker_id] of each claim."""
    claimed: dict[tuple[str, int], list[str]] = defaultdict(list)
    for step_uuid, _, to_state, attempt, worker_id, _, _ in cluster.transitions():
        if to_state == "in_progress":
            claimed[step_uuid, attempt].append(worker_id or "")
    return claimed


def assert_each_attempt_settled_once(cluster: Cluster, *, finished: bool = True) -> None:
    """Guarantee 3: every claimed attempt has exactly one settlement, by its claimant's id.

    Before the work is ``finished``, attempts still running have none yet: at most one.
    """
    # One snapshot: workers still running may claim between two reads of their own.
    with cluster.snapshot():
        claimed, settled = claims(cluster), settlements(cluster)
        rows = cluster.sql("SELECT step_uuid, state, attempts FROM workflow_steps")
    for step_uuid, state, attempts in rows:
        for attempt in range(1, attempts + 1):
            key = (step_uuid, attempt)
            assert len(claimed[key]) == 1, (key, claimed[key])
            if finished or settled[key]:
                assert len(settled[key]) == 1, (key, state, settled[key])
                assert settled[key][0][2] == claimed[key][0], (key, claimed[key], settled[key])
    assert set(settled) <= set(claimed)


def assert_each_attempt_ran_at_most_once(cluster: Cluster) -> Counter[tuple[str, int]]:
    runs = Counter((step_uuid, attempt) for step_uuid, attempt, _ in cluster.runs())
    assert runs, "no handler ran"
    twice = {key: n for key, n in runs.items() if n > 1}
    assert not twice, f"attempts started more than once: {twice}"
    attempts = dict(cluster.sql("SELECT step_uuid, attempts FROM workflow_steps"))
    per_step = Counter(step_uuid for step_uuid, _ in runs)
    for step_uuid, n in per_step.items():
        assert n <= attempts[step_uuid], (step_uuid, n, attempts[step_uuid])
    return runs
