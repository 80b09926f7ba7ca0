"""Start-up's plain logic (``duplex.worker.startup``): retrying transient database failures
within a bound, the stop signals, and telling ``duplex run`` from the other commands."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from duplex.errors import ConfigurationError, StartupError, StorageError
from duplex.worker.startup import (
    FIRST_DELAY_S,
    JITTER,
    MAX_DELAY_S,
    StartupStopped,
    StopSignals,
    backoff_delays,
    retry_transient,
    runs_the_worker,
)


class FakeTime:
    """A clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Failing:
    """An action that raises the given errors in turn, then returns ``"done"``; each try
    takes ``takes_s`` of the fake clock."""

    def __init__(self, time_: FakeTime, errors: list[Exception], takes_s: float = 0.0) -> None:
        self.time = time_
        self.errors = list(errors)
        self.takes_s = takes_s
        self.tries = 0

    def __call__(self) -> str:
        self.tries += 1
        self.time.now += self.takes_s
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def lost() -> StorageError:
    return StorageError("database error: terminating connection", transient=True)


def retry(
    action: Failing,
    time_: FakeTime,
    lines: list[str],
    *,
    timeout_s: float = 10.0,
    stopped: Callable[[], bool] = lambda: False,
) -> str:
    return retry_transient(
        action,
        what="do it",
        timeout_s=timeout_s,
        stopped=stopped,
        log=lines.append,
        clock=time_.clock,
        sleep=time_.sleep,
        delays=iter([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0, 5.0]),
    )


def test_transient_failures_are_retried_with_backoff_and_one_line_each() -> None:
    time_ = FakeTime()
    action = Failing(time_, [lost(), lost(), lost()])
    lines: list[str] = []
    assert retry(action, time_, lines) == "done"
    assert action.tries == 4
    assert sum(time_.slept) == pytest.approx(0.2 + 0.4 + 0.8)
    assert len(lines) == 3
    assert lines[0] == (
        "start-up: could not do it (database error: terminating connection); retrying in 0.2s "
        "(gives up after 10s of failures: worker.startup_timeout_s)"
    )


def test_it_gives_up_once_the_failures_have_lasted_the_timeout() -> None:
    time_ = FakeTime()
    # Each try itself takes 0.5 s (a connect that fails slowly).
    action = Failing(time_, [lost()] * 100, takes_s=0.5)
    lines: list[str] = []
    with pytest.raises(StartupError) as gave_up:
        retry(action, time_, lines, timeout_s=6.0)
    # Counted from the first failure, 0.5 s in; the last pause is cut to the time left, and
    # the try after it is the last one.
    elapsed = time_.now - 1000.5
    assert 6.0 <= elapsed <= 6.5
    assert str(gave_up.value) == (
        f"start-up gave up after {elapsed:.1f}s of database failures "
        "(worker.startup_timeout_s = 6): could not do it: database error: terminating connection"
    )
    assert len(lines) == action.tries - 1


def test_the_timeout_counts_from_the_first_failure_not_from_the_first_try() -> None:
    time_ = FakeTime()
    # A first try that waited longer than the timeout (for the migration's lock, say) and
    # then failed: the database answers again on the second try.
    action = Failing(time_, [lost()], takes_s=70.0)
    lines: list[str] = []
    assert retry(action, time_, lines, timeout_s=60.0) == "done"
    assert len(lines) == 1


@pytest.mark.parametrize(
    "error",
    [
        StorageError("database error: syntax error", transient=False),
        ConfigurationError("database.url: not a database URL"),
    ],
)
def test_errors_that_cannot_pass_fail_at_once(error: Exception) -> None:
    time_ = FakeTime()
    action = Failing(time_, [error])
    lines: list[str] = []
    with pytest.raises(type(error)):
        retry(action, time_, lines)
    assert action.tries == 1
    assert lines == []
    assert time_.slept == []


def test_a_stop_during_a_pause_ends_the_retry_promptly() -> None:
    time_ = FakeTime()
    action = Failing(time_, [lost()] * 10)
    lines: list[str] = []
    # Asked to stop 0.1 s into a 0.2 s pause.
    stop_at = time_.now + 0.1
    with pytest.raises(StartupStopped):
        retry(action, time_, lines, stopped=lambda: time_.now >= stop_at)
    assert action.tries == 1
    assert time_.now - 1000.0 <= 0.1 + 0.05 + 1e-9


def test_backoff_doubles_to_the_cap_within_the_jitter() -> None:
    low = backoff_delays(lambda: 0.0)
    high = backoff_delays(lambda: 1.0)
    expected = [FIRST_DELAY_S * 2**i for i in range(6)]
    expected = [min(MAX_DELAY_S, d) for d in expected] + [MAX_DELAY_S] * 3
    for want in expected:
        assert next(low) == pytest.approx(want * (1 - JITTER))
        assert next(high) == pytest.approx(want * (1 + JITTER))


@pytest.mark.parametrize(
    ("argv", "run"),
    [
        (["run"], True),
        (["run", "--until-idle"], True),
        (["--settings", "s.toml", "run"], True),
        (["--settings=s.toml", "run", "--concurrency", "2"], True),
        (["--settings", "run", "status"], False),  # a settings file named "run"
        (["status"], False),
        (["submit", "run"], False),
        (["--help"], False),
        ([], False),
    ],
)
def test_runs_the_worker(argv: list[str], run: bool) -> None:
    assert runs_the_worker(argv) is run


# --- the signal handler, with real signals sent to this process -------------------------


def send(signum: int) -> None:
    """Signal this thread (the main one): its handler runs before this call returns to the
    test, and a wait it is in is interrupted."""
    signal.pthread_kill(threading.main_thread().ident or 0, signum)


@pytest.fixture
def signals() -> Iterator[StopSignals]:
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    stop = StopSignals()
    stop.install()
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_signal_inside_an_interruptible_block_ends_a_blocking_wait(
    signals: StopSignals,
) -> None:
    def wait_long() -> None:
        with signals.interruptible():
            # From another thread, to the main one, while it sleeps (or, on a slow machine,
            # just before: it raises either way).
            threading.Timer(0.1, send, [signal.SIGTERM]).start()
            time.sleep(10)  # the handler raises here, at once

    started = time.monotonic()
    with pytest.raises(StartupStopped) as stopped:
        wait_long()
    assert time.monotonic() - started < 5
    assert stopped.value.signum == signal.SIGTERM
    assert signals.name == "SIGTERM"


def test_a_signal_outside_is_recorded_and_honoured_at_the_next_step(
    signals: StopSignals,
) -> None:
    asked: list[str] = []
    send(signal.SIGINT)
    assert signals.received == [signal.SIGINT]
    signals.on_stop(lambda: asked.append("stop"))
    assert asked == ["stop"]  # told at once: the signal came before anyone asked
    entered: list[bool] = []

    def enter() -> None:
        with signals.interruptible():
            entered.append(True)

    with pytest.raises(StartupStopped):
        enter()
    assert entered == [], "an interruptible block is not entered after a signal"
    with pytest.raises(StartupStopped):
        signals.raise_if_received()


def test_a_signal_in_a_deferred_part_raises_only_when_the_part_ends(
    signals: StopSignals,
) -> None:
    finished: list[str] = []

    def start_up() -> None:
        with signals.interruptible():
            with signals.deferred():
                send(signal.SIGTERM)  # the logger writing its line, say: it must finish
                finished.append("line written")
            finished.append("after the part")

    with pytest.raises(StartupStopped):
        start_up()
    assert finished == ["line written"]
    assert signals.received == [signal.SIGTERM]


def test_the_first_signal_calls_the_stop_callback(signals: StopSignals) -> None:
    asked: list[str] = []
    signals.on_stop(lambda: asked.append("stop"))
    assert asked == []
    send(signal.SIGTERM)
    assert asked == ["stop"]
    assert signals.name == "SIGTERM"


def test_the_stop_signals_install_before_any_heavy_import() -> None:
    # `duplex run` installs its handlers after `import duplex.worker.startup`: if that pulled in
    # SQLAlchemy (through the package's exports), a SIGTERM in the first half second would
    # still kill the worker by the default action.
    probe = (
        "import sys, duplex.worker.startup\n"
        "heavy = sorted(m for m in ('sqlalchemy', 'alembic', 'pykka', 'loguru', 'duplex.client')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == ""


def test_the_package_exports_load_on_first_use() -> None:
    import duplex

    assert sorted(duplex.__all__) == sorted(duplex._EXPORTS)
    for name in duplex.__all__:
        assert getattr(duplex, name).__name__ == name
    with pytest.raises(AttributeError, match="no_such_name"):
        duplex.no_such_name  # noqa: B018
