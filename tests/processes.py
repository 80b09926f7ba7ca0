"""Every process a test starts is stopped when the test ends, also when the test fails.

A ``ProcessOwner`` keeps the ``Popen`` of each process it starts. ``stop_all`` ends the ones
still running: SIGTERM (and SIGCONT, so that a process the test froze can act on it), a short
wait, then SIGKILL, and waits for each, so nothing outlives the owner. A process started
here leads a session of its own, so the signals go to its whole process group: children it
started go with it.

Three owners are always in place (fixtures in ``tests/conftest.py``): one per test, one per
module and one per session; ``current()`` is the innermost one. ``Duplex.start`` and the
other helpers that start processes register with it, so a test never has to remember to
stop what it started: a test that fails half-way leaves nothing running after pytest. A
SIGTERM to pytest interrupts it like Ctrl-C, so the owners stop their processes then too
(only SIGKILL of pytest itself leaves them behind).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# How long a process gets to exit on SIGTERM before it is killed.
TERM_GRACE_S = 5.0
# How long a killed process may take to be reaped (a process in uninterruptible sleep).
KILL_WAIT_S = 30.0


@dataclass
class _Owned:
    process: subprocess.Popen[Any]
    group: bool  # the process leads a process group of its own


class ProcessOwner:
    """The processes one test (or module, or session) started; ``stop_all`` ends them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._owned: list[_Owned] = []

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``args`` (``subprocess.Popen`` keywords) in a session of its own and own it."""
        kwargs.setdefault("start_new_session", True)
        process: subprocess.Popen[Any] = subprocess.Popen(args, **kwargs)
        return self.adopt(process, group=bool(kwargs["start_new_session"]))

    def adopt(self, process: subprocess.Popen[Any], *, group: bool) -> subprocess.Popen[Any]:
        """Own a process started elsewhere; ``group``: it leads a process group of its own."""
        self._owned.append(_Owned(process, group))
        return process

    @property
    def running(self) -> list[subprocess.Popen[Any]]:
        return [o.process for o in self._owned if o.process.poll() is None]

    def stop(self, process: subprocess.Popen[Any], grace_s: float = TERM_GRACE_S) -> None:
        """Stop one owned process now (e.g. before a fixture removes what it uses)."""
        owned = [o for o in self._owned if o.process is process]
        _stop(owned or [_Owned(process, False)], grace_s)
        self._owned = [o for o in self._owned if o.process is not process]

    def stop_all(self, grace_s: float = TERM_GRACE_S) -> list[int]:
        """Stop every owned process still running; return the pids that had to be stopped."""
        owned, self._owned = self._owned, []
        return _stop(list(reversed(owned)), grace_s)


def _stop(owned: list[_Owned], grace_s: float) -> list[int]:
    # Only a process not reaped yet is signalled: once reaped, its pid (and its process
    # group's number) may belong to another process.
    live = [o for o in owned if o.process.returncode is None and not _exited(o.process.pid)]
    for o in live:
        _signal(o, signal.SIGTERM)
        _signal(o, signal.SIGCONT)
    deadline = time.monotonic() + grace_s
    for o in live:
        while not _exited(o.process.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    for o in live:
        # Before the leader is reaped, so the group's number cannot have been reused yet:
        # the leader if it ignored SIGTERM, and whatever it left behind in its group.
        if o.group or not _exited(o.process.pid):
            _signal(o, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            o.process.wait(timeout=KILL_WAIT_S)
    return [o.process.pid for o in live]


def _exited(pid: int) -> bool:
    """Whether a child has exited, without reaping it (its pid stays reserved)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True  # reaped already (by Popen.poll or wait)
    return info is not None


def _signal(owned: _Owned, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if owned.group:
            os.killpg(owned.process.pid, signum)
        else:
            os.kill(owned.process.pid, signum)


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), or None if there is no such pid.

    A pid and its start time name one process: the pid alone may be reused.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name, in parentheses, may hold spaces: count fields after its end.
    return stat[stat.rindex(")") + 2 :].split()[19]


def run(
    args: Sequence[str], *, timeout: float, input: str | bytes | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` whose timeout kills the whole process group, not just the child."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs["start_new_session"] = True
    kwargs.pop("capture_output", None)
    check = kwargs.pop("check", False)
    with subprocess.Popen(
        args, stdin=subprocess.PIPE if input is not None else None, **kwargs
    ) as p:
        try:
            stdout, stderr = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            _stop([_Owned(p, True)], grace_s=0)
            exc.stdout, exc.stderr = p.communicate()  # what it wrote, as subprocess.run does
            raise
        except BaseException:
            # The test was interrupted: nothing of it may outlive this call.
            _stop([_Owned(p, True)], grace_s=0)
            raise
    result = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


# --- the owners in place, innermost last ----------------------------------------------------

_owners: list[ProcessOwner] = []


def current() -> ProcessOwner:
    """The innermost owner: the running test's (or, while a fixture of a wider scope sets
    up, that module's or the session's)."""
    assert _owners, "no ProcessOwner in place: tests/conftest.py installs them"
    return _owners[-1]


@contextlib.contextmanager
def owning(name: str) -> Iterator[ProcessOwner]:
    """Put a new owner in place for the duration; stop everything it owns at the end."""
    owner = ProcessOwner(name)
    _owners.append(owner)
    try:
        yield owner
    finally:
        _owners.remove(owner)
        stopped = owner.stop_all()
        if stopped:
            # Said, not failed: a test may rightly leave a worker to the teardown.
            print(f"\n[{name}] stopped process(es) left running: {stopped}")


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"pytest got {signal.Signals(signum).name}")


@pytest.fixture(scope="session", autouse=True)
def session_processes() -> Iterator[ProcessOwner]:
    """The session's owner. Also: SIGTERM interrupts pytest as Ctrl-C does, so that a
    terminated test run (a CI job's timeout) still tears its fixtures down and stops what
    its tests started, where the default action would end pytest on the spot."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupted)
    try:
        with owning("session") as owner:
            yield owner
    finally:
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module", autouse=True)
def module_processes(request: pytest.FixtureRequest) -> Iterator[ProcessOwner]:
    with owning(request.module.__name__) as owner:
        yield owner


@pytest.fixture(autouse=True)
def owned_processes(request: pytest.FixtureRequest) -> Iterator[ProcessOwner]:
    """The running test's processes: stopped at its teardown, whatever the outcome."""
    with owning(request.node.nodeid) as owner:
        yield owner
