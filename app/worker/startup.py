"""Start-up of ``duplex run``: stop signals from the first moment, and retried database work.

Start-up is everything before the worker serves: importing the handler modules, migrating
under the migration lock, registering the worker, starting the actors. Two things can
happen meanwhile.

A stop (SIGINT/SIGTERM). ``StopSignals`` is installed by ``duplex.__main__`` before the CLI's
own imports, so a signal is never met by the default action (an exit by signal with nothing
logged). While start-up waits on something that can take long (an import, the database, a
retry's pause) the handler raises ``StartupStopped``, which ends that wait at once; anywhere
else it only records the signal, and start-up honours it at its next step. Either way the
worker stops before serving. A second signal exits at once, as it does while draining.

A transient database failure. ``retry_transient`` tries again with backoff, one log line
per try, until the database has kept failing for ``worker.startup_timeout_s``; then it
raises ``StartupError``. Errors that cannot pass fail at once.

This module imports nothing heavy: ``duplex.__main__`` installs the signals before the CLI
loads SQLAlchemy, Alembic, the actors and the user's handlers.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

from duplex.errors import StartupError, StorageError

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Backoff between start-up tries: doubling from the first delay up to the cap, each delay
# spread by the jitter so that workers started together do not retry in step.
FIRST_DELAY_S = 0.2
MAX_DELAY_S = 5.0
JITTER = 0.2
# How often a wait looks whether a stop was asked for: the signal handler only records the
# signal, and an embedding program's Worker.request_stop only sets a flag.
STOP_POLL_S = 0.05


class StartupStopped(KeyboardInterrupt):
    """A stop was asked for during start-up; the worker stops before serving.

    A KeyboardInterrupt, so that psycopg cancels the query it was waiting on (the migration's
    lock, say) rather than leave the server's backend queued on it.
    """

    def __init__(self, signum: int | None = None) -> None:
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """The SIGINT/SIGTERM handler of ``duplex run``.

    The first signal is recorded (``received``) and passed on to ``on_stop``'s callback;
    inside an ``interruptible()`` block it also raises ``StartupStopped`` on the main thread.
    A second signal exits at once with 128 + its number.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._interruptible = False
        self._request_stop: Callable[[], None] | None = None

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # It may run anywhere on the main thread, even inside the logger: no logging, no
        # locks; the line about the signal is written by whoever honours it.
        if self.received:
            # Second signal: leave now; in-flight claims are recovered by the liveness rule.
            os.write(2, b"duplex: second signal: exiting at once\n")
            os._exit(128 + signum)
        self.received.append(signum)
        if self._request_stop is not None:
            self._request_stop()
        if self._interruptible:
            self._interruptible = False
            raise StartupStopped(signum)

    @property
    def name(self) -> str:
        """The first signal's name, e.g. ``SIGTERM`` (``stop`` when none was received)."""
        return signal.Signals(self.received[0]).name if self.received else "stop"

    def on_stop(self, request_stop: Callable[[], None]) -> None:
        """Call ``request_stop`` on the first signal (now, if it came already)."""
        self._request_stop = request_stop
        if self.received:
            request_stop()

    def raise_if_received(self) -> None:
        if self.received:
            raise StartupStopped(self.received[0])

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A signal during the block raises ``StartupStopped`` at once, wherever the main
        thread waits; one received before the block raises on entry."""
        self._interruptible = True
        try:
            self.raise_if_received()
            yield
        finally:
            self._interruptible = False

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside an ``interruptible()`` block, a part where a signal must not raise (the
        logger holds its lock while it writes): a signal is recorded, and raises when the
        part ends."""
        was = self._interruptible
        self._interruptible = False
        try:
            yield
        finally:
            self._interruptible = was
        if was:
            self.raise_if_received()


_installed: StopSignals | None = None


def stop_signals() -> StopSignals:
    """Return this process's ``StopSignals``, installing them on the first call."""
    global _installed
    if _installed is None:
        signals = StopSignals()
        signals.install()
        _installed = signals
    return _installed


def runs_the_worker(argv: Sequence[str]) -> bool:
    """Whether the command line ``duplex <argv>`` is ``duplex run`` (the only command whose
    start-up is slow enough to need the signals before the CLI has even been imported)."""
    args = iter(argv)
    for arg in args:
        if arg == "--settings":
            next(args, None)  # its value
        elif not arg.startswith("-"):
            return arg == "run"
    return False


def backoff_delays(rng: Callable[[], float] = random.random) -> Iterator[float]:
    """Yield the pauses between tries: ``FIRST_DELAY_S`` doubling to ``MAX_DELAY_S``, each
    spread by ``JITTER`` either way."""
    delay = FIRST_DELAY_S
    while True:
        yield delay * (1 + JITTER * (2 * rng() - 1))
        delay = min(MAX_DELAY_S, delay * 2)


def retry_transient(
    action: Callable[[], T],
    *,
    what: str,
    timeout_s: float,
    stopped: Callable[[], bool],
    log: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    delays: Iterator[float] | None = None,
) -> T:
    """Run ``action``; while it fails with a transient ``StorageError``, try again.

    Each failure logs one line and pauses (``backoff_delays``). When the failures have gone
    on for ``timeout_s`` (counted from the first failure: a try that waited long, for the
    migration's lock say, and then failed has not used up the time), raise
    ``StartupError`` naming ``what`` and the last error. A non-transient error is raised at
    once. When ``stopped()`` turns true during a pause, raise ``StartupStopped``.
    """
    pauses = delays if delays is not None else backoff_delays()
    failing_since: float | None = None
    while True:
        try:
            return action()
        except StorageError as exc:
            if not exc.transient:
                raise
            if failing_since is None:
                failing_since = clock()
            left = failing_since + timeout_s - clock()
            if left <= 0:
                raise StartupError(
                    f"start-up gave up after {clock() - failing_since:.1f}s of database "
                    f"failures (worker.startup_timeout_s = {timeout_s:g}): could not {what}: "
                    f"{exc}"
                ) from exc
            pause = min(next(pauses), left)
            log(
                f"start-up: could not {what} ({exc}); retrying in {pause:.1f}s "
                f"(gives up after {timeout_s:g}s of failures: worker.startup_timeout_s)"
            )
            if wait_for_stop(pause, stopped, clock=clock, sleep=sleep):
                raise StartupStopped() from exc


def wait_for_stop(
    seconds: float,
    stopped: Callable[[], bool],
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
) -> bool:
    """Wait until ``seconds`` have passed or ``stopped()`` turns true; return ``stopped()``.

    It looks every ``STOP_POLL_S``. A ``sleep`` that returns true ends the wait early (an
    event's ``wait``: something woke the waiter).
    """
    end = clock() + seconds
    while not stopped():
        left = end - clock()
        if left <= 0 or sleep(min(STOP_POLL_S, left)):
            break
    return stopped()
