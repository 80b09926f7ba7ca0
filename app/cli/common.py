"""What every ``duplex`` command shares: exit codes, one-line errors, the database, stop signals.

* ``run_command`` runs a command's body: a ``DuplexError`` (``InputError`` among them) becomes
  one line on stderr and exit 1, Ctrl-C exit 130, a bug one line too (never a traceback), and
  a closed standard output ends the process as it ends ``cat`` (``duplex.cli.output``).
* ``open_database`` opens the database, checks that its schema is at head, and disposes of
  the engine however the block ends, the check's own failure included.
* ``stop_signals_received`` turns SIGINT/SIGTERM into a ``StopRequest`` that loops poll: the
  signal handler (``duplex.worker.startup.StopSignals``, as ``duplex run`` has it) only records
  the signal, so a signal never interrupts a query and takes no lock. Its waits poll as
  start-up's retry pauses do (``duplex.worker.startup.wait_for_stop``).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from loguru import logger

from duplex.cli.output import exit_for_closed_output, reader_gone
from duplex.errors import DuplexError, SchemaNotReadyError, StorageError
from duplex.settings import Settings
from duplex.storage.db import Database
from duplex.storage.schema import ensure_schema_ready
from duplex.worker.startup import STOP_SIGNALS, StopSignals, wait_for_stop

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def run_command(body: Callable[[], int]) -> int:
    """Run the whole of one ``duplex`` command line and return its exit code.

    Output to a pipe whose reader went away (``duplex events | head -1``) ends the process as
    it ends ``cat`` or ``grep``: killed by SIGPIPE, quietly (``duplex.cli.output``).
    """
    try:
        try:
            return _one_line_errors(body)
        finally:
            # Whatever is still buffered is written here, where a closed pipe is handled,
            # rather than by the interpreter on its way out ("Exception ignored ...").
            sys.stdout.flush()
    except BrokenPipeError as exc:
        if reader_gone():
            exit_for_closed_output()
        return internal_error(exc)


def _one_line_errors(body: Callable[[], int]) -> int:
    try:
        return body()
    except DuplexError as exc:
        say(f"duplex: error: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        say("duplex: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise  # run_command tells a closed stdout from a broken socket
    except Exception as exc:
        return internal_error(exc)


def internal_error(exc: BaseException) -> int:
    """A bug in Duplex: one line on stderr (the traceback goes to the debug log only)."""
    logger.opt(exception=exc).debug("unexpected error")
    say(f"duplex: internal error: {type(exc).__name__}: {exc}")
    return EXIT_ERROR


def say(line: str) -> None:
    """One line on stderr; a stderr nobody reads any more is not a reason for a traceback."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr)


@contextmanager
def open_database(
    settings: Settings,
    *,
    check_schema: bool = True,
    unavailable: Callable[[StorageError], None] | None = None,
    ping_after_idle_s: float = 0.0,
) -> Iterator[Database]:
    """The database of ``settings``, its schema checked; the engine is disposed on the way out.

    ``check_schema=False`` for the commands that migrate it themselves. With ``unavailable``,
    a database that cannot be reached is passed to it rather than raised (a schema that is
    not at head still raises ``SchemaNotReadyError``). ``ping_after_idle_s``: see ``Database``.
    """
    db = Database(settings.database, ping_after_idle_s=ping_after_idle_s)
    try:
        if check_schema:
            _check_schema(db, unavailable)
        yield db
    finally:
        db.dispose()


def _check_schema(db: Database, unavailable: Callable[[StorageError], None] | None) -> None:
    try:
        ensure_schema_ready(db)
    except SchemaNotReadyError:
        raise
    except StorageError as exc:
        if unavailable is None:
            raise
        unavailable(exc)


class StopRequest:
    """Whether SIGINT or SIGTERM came, for a loop that waits between its rounds."""

    def __init__(self, signals: StopSignals | None) -> None:
        self._signals = signals

    @property
    def requested(self) -> bool:
        return self._signals is not None and bool(self._signals.received)

    def wait(self, timeout_s: float, wake: threading.Event | None = None) -> bool:
        """Wait until ``timeout_s`` has passed, ``wake`` is set, or a stop signal came; return
        whether a stop was requested. ``wake`` is left set for the caller to clear."""
        waiter = wake if wake is not None else threading.Event()
        return wait_for_stop(timeout_s, lambda: self.requested, sleep=waiter.wait)


@contextmanager
def stop_signals_received() -> Iterator[StopRequest]:
    """For the block, SIGINT and SIGTERM are recorded rather than raised; then the previous
    handlers are back. A second signal exits at once with 128 + its number, as it does for
    ``duplex run``. Off the main thread (embedded use) nothing is installed: Ctrl-C stays a
    ``KeyboardInterrupt``."""
    if threading.current_thread() is not threading.main_thread():
        yield StopRequest(None)
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    signals = StopSignals()
    signals.install()
    try:
        yield StopRequest(signals)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
