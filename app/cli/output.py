"""Standard output that may be a pipe whose reader went away: ``duplex events | head -1``.

A Unix tool whose reader is gone (``cat``, ``grep``, ``ls``) is killed by SIGPIPE at its next
write: it stops at once and quietly, and a shell reports status 141. Python ignores SIGPIPE,
so that a broken socket raises instead of killing the process; a closed pipe then becomes
``BrokenPipeError`` at the next write, and "Exception ignored" when the interpreter flushes
stdout on its way out. The CLI catches that error in one place
(``duplex.cli.common.run_command``) and ends the way those tools do: killed by SIGPIPE,
nothing on stderr.

SIGPIPE is not restored for the whole process: a broken connection to the database or the
broker must stay an error, never a silent death.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import sys
from typing import IO, Any, NoReturn


def reader_gone(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (stdout by default) is a pipe or socket nobody reads any more.

    A pipe whose reading end is closed polls as POLLERR on its writing end (POLLHUP for a
    socket); a file, a terminal or /dev/null never does. Costs one ``poll`` with no wait.
    """
    stream = stream if stream is not None else sys.stdout
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # no descriptor: embedded, or a StringIO
        return False
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR and POLLHUP are reported whatever the mask asks for
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))


def check_reader() -> None:
    """Raise ``BrokenPipeError`` once stdout's reader is gone.

    For loops that may go a long time without writing (``events --follow``, a piped
    ``status --watch``): they notice a closed pipe without waiting for their next line, as
    ``tail -f`` does.
    """
    if reader_gone():
        raise BrokenPipeError(errno.EPIPE, "the reader of standard output went away")


def exit_for_closed_output() -> NoReturn:
    """End the process as a Unix tool whose reader went away: killed by SIGPIPE, quietly.

    Standard output is pointed at /dev/null first, so nothing left in a buffer fails again.
    """
    with contextlib.suppress(AttributeError, OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(128 + signal.SIGPIPE)  # not reached: the signal ends the process first


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout (what is not JSON by nature as its ``str``)."""
    print(json.dumps(data, indent=2, default=str))
