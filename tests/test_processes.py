"""The process owners of ``tests/processes.py``: what a test starts never outlives it.

The end-to-end proof runs pytest on a small test file of its own, in a subprocess: its tests
start real ``duplex run`` workers and then fail. Once that pytest has exited, every worker
it started must be gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import processes
from tests.cli.support import wait_for
from tests.processes import ProcessOwner, start_time

REPO_ROOT = Path(__file__).resolve().parent.parent
PIDS_ENV = "PROCESS_TEST_PIDS"


def alive(pid: int, started: str) -> bool:
    """Whether that very process still exists (a zombie not yet reaped counts as gone)."""
    if start_time(pid) != started:
        return False
    state = Path(f"/proc/{pid}/stat").read_text()
    return state[state.rindex(")") + 2] != "Z"


def gone_soon(pid: int, started: str, timeout_s: float = 10.0) -> bool:
    """Wait until that process is gone (an orphan is reaped by init a moment after it died)."""
    deadline = time.monotonic() + timeout_s
    while alive(pid, started):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def kill_survivors(recorded: list[tuple[int, str]]) -> None:
    for pid, started in recorded:
        if alive(pid, started):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


PYTHON_SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
IGNORES_SIGTERM = [
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', "
    "flush=True); time.sleep(600)",
]
# A process that starts a child of its own, prints the child's pid, and sleeps.
WITH_A_CHILD = [
    sys.executable,
    "-c",
    "import subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
    "print(child.pid, flush=True); time.sleep(600)",
]


@pytest.fixture
def owner() -> Iterator[ProcessOwner]:
    owner = ProcessOwner("unit")
    try:
        yield owner
    finally:
        owner.stop_all(grace_s=0)


def test_stop_all_ends_a_running_process(owner: ProcessOwner) -> None:
    process = owner.popen(PYTHON_SLEEPER)
    assert owner.stop_all() == [process.pid]
    assert process.returncode == -signal.SIGTERM
    assert owner.running == []


def test_a_process_that_ignores_sigterm_is_killed(owner: ProcessOwner) -> None:
    process = owner.popen(IGNORES_SIGTERM, stdout=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stdout.readline() == b"ready\n"  # its handler is in place
    began = time.monotonic()
    assert owner.stop_all(grace_s=0.3) == [process.pid]
    assert process.returncode == -signal.SIGKILL
    assert time.monotonic() - began < 10


def test_a_frozen_process_is_stopped_too(owner: ProcessOwner) -> None:
    process = owner.popen(PYTHON_SLEEPER)
    os.kill(process.pid, signal.SIGSTOP)
    owner.stop_all(grace_s=5)
    # SIGTERM alone would wait for a SIGCONT that never comes; it got one.
    assert process.returncode == -signal.SIGTERM


def test_the_children_of_a_process_go_with_it(owner: ProcessOwner) -> None:
    process = owner.popen(WITH_A_CHILD, stdout=subprocess.PIPE)
    assert process.stdout is not None
    child = int(process.stdout.readline())
    child_started = start_time(child)
    assert child_started is not None
    try:
        owner.stop_all()
        assert gone_soon(child, child_started), "the child of the stopped process still runs"
    finally:
        kill_survivors([(child, child_started)])


def test_a_process_that_already_exited_is_left_alone(owner: ProcessOwner) -> None:
    process = owner.popen([sys.executable, "-c", "pass"])
    process.wait()
    assert owner.stop_all() == []


def test_run_kills_the_whole_group_on_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); print('started', flush=True); "
        "time.sleep(600)"
    )
    began = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        processes.run([sys.executable, "-c", script], timeout=2, text=True)
    assert time.monotonic() - began < 20
    assert str(timed_out.value.stdout) == "started\n"  # its output so far, as subprocess.run
    child = int(pid_file.read_text())
    child_started = start_time(child)
    try:
        assert child_started is None or gone_soon(child, child_started), (
            "the timed-out command's child still runs"
        )
    finally:
        kill_survivors([(child, child_started)] if child_started else [])


# --- the end-to-end proof: failing tests leave no worker behind ------------------------------

INNER_PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]

INNER_CONFTEST = """
from tests.processes import module_processes, owned_processes, session_processes

__all__ = ["module_processes", "owned_processes", "session_processes"]
"""

INNER_TESTS = """
import os
import signal
from pathlib import Path

import pytest

from tests.cli.support import make_duplex, wait_for
from tests.processes import start_time


def started_worker(directory):
    duplex = make_duplex(directory)
    duplex.ok("migrate")
    worker = duplex.start("run")
    with open(os.environ["PROCESS_TEST_PIDS"], "a") as pids:
        pids.write(f"{worker.pid} {start_time(worker.pid)}\\n")
    wait_for(lambda: " started: " in duplex.stderr_text(), "the worker to start")
    return worker


@pytest.fixture(scope="module")
def module_worker(tmp_path_factory):
    return started_worker(tmp_path_factory.mktemp("module"))


def test_fails_while_its_worker_runs(tmp_path):
    started_worker(tmp_path)
    raise AssertionError("failing on purpose, the worker still running")


def test_fails_while_its_worker_is_frozen(tmp_path):
    worker = started_worker(tmp_path)
    os.kill(worker.pid, signal.SIGSTOP)
    raise AssertionError("failing on purpose, the worker frozen")


def test_fails_with_a_worker_of_a_module_fixture(module_worker):
    raise AssertionError("failing on purpose, the module's worker still running")


def test_waits_with_its_worker_running(tmp_path):
    started_worker(tmp_path)
    Path(os.environ["PROCESS_TEST_PIDS"] + ".waiting").touch()
    signal.pause()  # until pytest is terminated
"""


@pytest.mark.e2e
def test_workers_of_failing_tests_are_gone_once_pytest_exits(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text(INNER_CONFTEST)
    (inner / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    pids = tmp_path / "pids"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEX_")}
    env.update(PYTHONPATH=str(REPO_ROOT), **{PIDS_ENV: str(pids)})
    recorded: list[tuple[int, str]] = []
    try:
        result = processes.run(
            [*INNER_PYTEST, "-k", "fails", str(inner)],
            cwd=inner,
            env=env,
            text=True,
            timeout=180,
        )
        if pids.exists():
            recorded = [
                (int(p), t) for p, t in (line.split() for line in pids.read_text().splitlines())
            ]
        assert "3 failed" in result.stdout, result.stdout + result.stderr
        assert len(recorded) == 3, recorded
        survivors = [pid for pid, started in recorded if not gone_soon(pid, started, 2.0)]
        assert not survivors, f"worker(s) still running after pytest exited: {survivors}"
    finally:
        kill_survivors(recorded)


@pytest.mark.e2e
def test_workers_are_gone_when_pytest_is_terminated(tmp_path: Path) -> None:
    """SIGTERM to pytest (a CI job's timeout) while a test waits with a worker running."""
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text(INNER_CONFTEST)
    (inner / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    pids = tmp_path / "pids"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEX_")}
    env.update(PYTHONPATH=str(REPO_ROOT), **{PIDS_ENV: str(pids)})
    recorded: list[tuple[int, str]] = []
    with open(tmp_path / "inner.out", "wb") as out:
        pytest_process = processes.current().popen(
            [*INNER_PYTEST, "-k", "waits", str(inner)],
            cwd=inner,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        waiting = Path(f"{pids}.waiting")
        wait_for(
            lambda: waiting.exists() or pytest_process.poll() is not None, "the inner test to wait"
        )
        recorded = [
            (int(p), t) for p, t in (line.split() for line in pids.read_text().splitlines())
        ]
        assert len(recorded) == 1, recorded
        assert alive(*recorded[0]), "the worker is not running"
        pytest_process.send_signal(signal.SIGTERM)
        pytest_process.wait(timeout=60)
        assert not [pid for pid, started in recorded if not gone_soon(pid, started, 2.0)], (
            "the worker is still running after pytest was terminated"
        )
    finally:
        kill_survivors(recorded)
