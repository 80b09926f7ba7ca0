"""Every ``duplex`` command writing into a pipe whose reader went away (``duplex ... | head``).

The contract: the command ends quietly, as ``cat`` or ``grep`` do, killed by SIGPIPE (a shell
reports 141; ``subprocess`` reports -13). Nothing on stderr about it: no traceback, no
"internal error", no "Exception ignored". A command that never writes to stdout (``relay``,
``dashboard``) is not affected at all. Why SIGPIPE rather than exit 0 or Python's exit 1:
it is what every Unix tool does, so ``set -o pipefail`` scripts see the same status as for
``cat file | head -1``, and it cannot be mistaken for a failure of Duplex (exit 1).

Each command is a real subprocess. The moment is made, never waited for:

* "at once": the pipe's read end is closed before the command starts, so its first write
  to stdout fails;
* "after the first line": the test reads the first line from a pipe shrunk to 4 KiB, then
  closes it, while the command still has far more than that to write (1000 tasks or events),
  so the command is blocked on the full pipe, or writes again, after the close.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import pika
import pytest

from duplex.cli.main import build_parser
from duplex.client import Client
from tests import processes as owned_processes
from tests.cli.support import Duplex, make_duplex, migrated_file, wait_for
from tests.relay_support import RABBITMQ_URL, require_rabbitmq

pytestmark = pytest.mark.e2e

KILLED_BY_SIGPIPE = -signal.SIGPIPE
TIMEOUT_S = 60.0
TASKS = 1000
ONE_STEP = 'name = "pipes_one_step"\n[[steps]]\nname = "only"\nhandler = "e2e.echo"\n'
ONE_WAIT = 'name = "pipes_one_wait"\n[[steps]]\nname = "only"\nkind = "wait"\nsignal = "go"\n'
# What must never reach stderr because stdout was closed.
NOISE = ("Traceback", "internal error", "Exception ignored", "BrokenPipeError", "Broken pipe")


class Processes:
    """Owns every process a test starts: whatever is still running is killed in teardown."""

    def __init__(self) -> None:
        self._started: list[subprocess.Popen[bytes]] = []

    def start(
        self, duplex: Duplex, args: Sequence[str], *, stdout: int, stderr: IO[bytes]
    ) -> subprocess.Popen[bytes]:
        proc = owned_processes.current().popen(
            duplex.command(args), cwd=duplex.cwd, env=duplex.env, stdout=stdout, stderr=stderr
        )
        self._started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self._started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def processes() -> Iterator[Processes]:
    owner = Processes()
    try:
        yield owner
    finally:
        owner.stop_all()


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database with 1000 finished one-step tasks, their events and a stopped worker."""
    duplex = make_duplex(tmp_path_factory.mktemp("pipes"))
    migrated_file(duplex)
    template = duplex.cwd / "one_step.toml"
    template.write_text(ONE_STEP)
    with Client(f"sqlite:///{duplex.db_path}") as client:
        client.submit_many(template, [{"i": i} for i in range(TASKS)])
    run = duplex.run("run", "--until-idle", timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return migrated_file(duplex)  # folds the WAL into the file the tests copy


@pytest.fixture
def duplex(tmp_path: Path, populated: Path) -> Duplex:
    env = make_duplex(tmp_path / "work")
    shutil.copyfile(populated, env.db_path)
    return env


def sql(duplex: Duplex, query: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(duplex.db_path, timeout=10)
    try:
        rows = conn.execute(query, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def new_task(duplex: Duplex) -> tuple[str, str]:
    """Submit a fresh one-step task; return (task_uuid, step_uuid)."""
    template = duplex.cwd / "one_step.toml"
    template.write_text(ONE_STEP)
    with Client(f"sqlite:///{duplex.db_path}") as client:
        task = client.submit(template, {})
    ((step,),) = sql(duplex, "SELECT step_uuid FROM workflow_steps WHERE task_uuid = ?", [task])
    return task, str(step)


def waiting_task(duplex: Duplex) -> str:
    """Submit a fresh task whose one step waits for the signal ``go``."""
    template = duplex.cwd / "one_wait.toml"
    template.write_text(ONE_WAIT)
    with Client(f"sqlite:///{duplex.db_path}") as client:
        return client.submit(template, {})


def failed_step(duplex: Duplex) -> str:
    """A step in error, as a permanent failure leaves it."""
    task, step = new_task(duplex)
    error = json.dumps({"error_type": "permanent_error", "message": "no", "retryable": False})
    sql(
        duplex,
        "UPDATE workflow_steps SET state = 'error', attempts = 1, error = ? WHERE step_uuid = ?",
        [error, step],
    )
    sql(duplex, "UPDATE tasks SET state = 'error' WHERE task_uuid = ?", [task])
    return step


def dead_lettered_event(duplex: Duplex) -> str:
    ((event_id,),) = sql(duplex, "SELECT event_id FROM domain_events ORDER BY created_at LIMIT 1")
    sql(
        duplex,
        "UPDATE domain_events SET dead_lettered_at = created_at, publish_attempts = 5, "
        "publish_error = 'refused' WHERE event_id = ?",
        [event_id],
    )
    return str(event_id)


def some_task(duplex: Duplex) -> str:
    ((task,),) = sql(duplex, "SELECT task_uuid FROM tasks LIMIT 1")
    return str(task)


def assert_quiet(stderr: str, args: Sequence[str]) -> None:
    for noise in NOISE:
        assert noise not in stderr, f"duplex {' '.join(args)}: {noise!r} on stderr:\n{stderr}"


def closed_at_once(
    processes: Processes, duplex: Duplex, *args: str, timeout: float = TIMEOUT_S
) -> tuple[int, str]:
    """Run with stdout a pipe nobody reads (its read end closed first); return (rc, stderr)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    err_path = duplex.cwd / f"stderr-{uuid.uuid4().hex[:8]}"
    with open(err_path, "wb") as err:
        try:
            proc = processes.start(duplex, args, stdout=write_end, stderr=err)
        finally:
            os.close(write_end)
        returncode = proc.wait(timeout)
    return returncode, err_path.read_text(errors="replace")


def closed_after_first_line(
    processes: Processes, duplex: Duplex, *args: str
) -> tuple[str, int, str]:
    """Read the first line, close the pipe, let the command go on; return (line, rc, stderr)."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    err_path = duplex.cwd / f"stderr-{uuid.uuid4().hex[:8]}"
    with open(err_path, "wb") as err:
        try:
            proc = processes.start(duplex, args, stdout=write_end, stderr=err)
        finally:
            os.close(write_end)
        got = b""
        try:
            while b"\n" not in got:
                chunk = os.read(read_end, 4096)
                assert chunk, f"duplex {' '.join(args)} ended before its first line"
                got += chunk
        finally:
            os.close(read_end)
        returncode = proc.wait(TIMEOUT_S)
    return got.split(b"\n")[0].decode(), returncode, err_path.read_text(errors="replace")


# --- the commands ---------------------------------------------------------------------------

# Every command of the parser, and the tests below that cover it; a new command without a
# case here fails ``test_every_command_is_covered``.
COVERED = {
    "run",
    "submit",
    "status",
    "cancel",
    "retry",
    "resolve",
    "complete",
    "signal",
    "workers",
    "relay",
    "events",
    "prune",
    "dashboard",
    "migrate",
    "schedule",
    "pause",
    "resume",
    "limits",
}


def test_every_command_is_covered() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == COVERED


def one_shot_cases(duplex: Duplex) -> list[list[str]]:
    task = some_task(duplex)
    step_error = failed_step(duplex)
    step_to_resolve = failed_step(duplex)
    step_to_complete = failed_step(duplex)
    cancellable, _ = new_task(duplex)
    return [
        ["--help"],
        ["status", "--help"],
        ["migrate"],
        ["submit", str(duplex.cwd / "one_step.toml")],
        ["status"],
        ["status", "--json"],
        ["status", task],
        ["status", task, "--json"],
        ["status", task, "--watch"],
        ["cancel", cancellable],
        ["retry", step_error],
        ["resolve", step_to_resolve],
        ["complete", step_to_complete, "--result", "{}"],
        ["signal", waiting_task(duplex), "go"],
        ["workers"],
        ["workers", "--json"],
        ["events"],
        ["events", "--json"],
        ["events", "--task", task],
        ["events", "--follow"],
        ["events", "retry", dead_lettered_event(duplex)],
        ["prune", "--older-than", "1d", "--dry-run"],
        ["prune", "--older-than", "1d"],
        ["schedule", "add", "pipes", str(duplex.cwd / "one_step.toml"), "--every", "1h"],
        ["schedule", "list"],
        ["schedule", "list", "--json"],
        ["schedule", "show", "pipes"],
        ["schedule", "pause", "pipes"],
        ["schedule", "resume", "pipes"],
        ["schedule", "sync"],
        ["schedule", "remove", "pipes"],
        ["pause", "pipes-ns", "--reason", "a test"],
        ["status"],
        ["resume", "pipes-ns"],
        ["limits", "set", "pipes_api", "10/s"],
        ["limits", "list"],
        ["limits", "list", "--json"],
    ]


def test_every_writing_command_dies_of_sigpipe_quietly_when_nobody_reads(
    processes: Processes, duplex: Duplex
) -> None:
    for args in one_shot_cases(duplex):
        returncode, stderr = closed_at_once(processes, duplex, *args)
        command = " ".join(args)
        assert returncode == KILLED_BY_SIGPIPE, f"duplex {command}: exit {returncode}\n{stderr}"
        assert_quiet(stderr, args)


def test_what_a_command_did_before_its_output_broke_stands(
    processes: Processes, duplex: Duplex
) -> None:
    """The write transaction commits before the line that reports it."""
    task, _ = new_task(duplex)
    returncode, stderr = closed_at_once(processes, duplex, "cancel", task)
    assert returncode == KILLED_BY_SIGPIPE, stderr
    assert sql(duplex, "SELECT state FROM tasks WHERE task_uuid = ?", [task]) == [("cancelled",)]
    ((before,),) = sql(duplex, "SELECT count(*) FROM tasks")
    returncode, stderr = closed_at_once(
        processes, duplex, "submit", str(duplex.cwd / "one_step.toml")
    )
    assert returncode == KILLED_BY_SIGPIPE, stderr
    assert sql(duplex, "SELECT count(*) FROM tasks") == [(before + 1,)]


@pytest.mark.parametrize(
    ("args", "first"),
    [
        (["status", "--limit", "1000"], "TASK"),
        (["status", "--limit", "1000", "--json"], "{"),
        (["events"], str(datetime.now(UTC).year)),
        (["events", "--json"], '{"event_id"'),
        (["events", "--follow"], str(datetime.now(UTC).year)),
    ],
)
def test_a_reader_that_leaves_after_the_first_line(
    processes: Processes, duplex: Duplex, args: list[str], first: str
) -> None:
    line, returncode, stderr = closed_after_first_line(processes, duplex, *args)
    assert line.startswith(first), line
    assert returncode == KILLED_BY_SIGPIPE, f"exit {returncode}\n{stderr}"
    assert_quiet(stderr, args)


def test_follow_notices_the_reader_left_without_anything_to_write(
    processes: Processes, duplex: Duplex
) -> None:
    """`events --task T --follow` on a quiet task stops once nobody reads, as `tail -f` does."""
    task, _ = new_task(duplex)  # no events: nothing is ever written
    returncode, stderr = closed_at_once(processes, duplex, "events", "--task", task, "--follow")
    assert returncode == KILLED_BY_SIGPIPE, stderr
    assert_quiet(stderr, ["events", "--follow"])


def test_watch_notices_the_reader_left_while_the_task_runs(
    processes: Processes, duplex: Duplex
) -> None:
    """A piped `status --watch` of an unfinished task stops once its reader is gone."""
    task, _ = new_task(duplex)  # enqueued; no worker runs, so it never finishes
    line, returncode, stderr = closed_after_first_line(
        processes, duplex, "status", task, "--watch", "--interval", "0.05"
    )
    assert line.startswith(f"task {task}"), line
    assert returncode == KILLED_BY_SIGPIPE, stderr
    assert_quiet(stderr, ["status", "--watch"])


def test_run_until_idle_stops_in_order_and_quietly(processes: Processes, duplex: Duplex) -> None:
    for _ in range(5):
        new_task(duplex)
    returncode, stderr = closed_at_once(processes, duplex, "run", "--until-idle")
    assert returncode == KILLED_BY_SIGPIPE, stderr
    assert_quiet(stderr, ["run", "--until-idle"])
    assert "stopped" in stderr  # the worker went through its orderly stop
    # Nothing is left claimed by the dead process: the stop handed back or committed it all.
    assert sql(duplex, "SELECT count(*) FROM workflow_steps WHERE state = 'in_progress'") == [(0,)]


def test_in_a_shell_pipeline_head_gets_one_line_and_the_status_is_141(duplex: Duplex) -> None:
    shell = shutil.which("bash")
    assert shell is not None
    script = (
        f"set -o pipefail; {sys.executable} -m duplex events | head -1; "
        'echo "statuses ${PIPESTATUS[0]} ${PIPESTATUS[1]}"'
    )
    result = subprocess.run(
        [shell, "-c", script],
        cwd=duplex.cwd,
        env=duplex.env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert "e2e.echoed" in lines[0]
    assert lines[1] == "statuses 141 0"
    assert result.stderr == ""


def test_commands_that_never_write_to_stdout_are_not_affected(
    processes: Processes, duplex: Duplex
) -> None:
    """`dashboard` serves until SIGTERM and `relay --until-idle` publishes: exit 0 both."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    err_path = duplex.cwd / "dashboard.stderr"
    with open(err_path, "wb") as err:
        try:
            dashboard = processes.start(
                duplex, ["dashboard", "--port", "0"], stdout=write_end, stderr=err
            )
        finally:
            os.close(write_end)
    wait_for(lambda: "serving http://" in err_path.read_text(), "the dashboard to serve")
    dashboard.send_signal(signal.SIGTERM)
    assert dashboard.wait(TIMEOUT_S) == 0, err_path.read_text()
    assert_quiet(err_path.read_text(), ["dashboard"])

    require_rabbitmq()
    exchange = f"duplex.test.pipes.{uuid.uuid4().hex[:10]}"
    duplex.env["DUPLEX_RELAY__EXCHANGE"] = exchange
    try:
        returncode, stderr = closed_at_once(processes, duplex, "relay", "--until-idle")
    finally:
        connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        connection.channel().exchange_delete(exchange)
        connection.close()
    assert returncode == 0, stderr
    assert_quiet(stderr, ["relay"])
    assert sql(duplex, "SELECT count(*) FROM domain_events WHERE published_at IS NULL") == [(0,)]
