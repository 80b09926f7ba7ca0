"""Handlers for the cancel end-to-end test (``tests/e2e/test_cancel_e2e.py``); they run inside
``duplex run`` subprocesses.

``cancels.until_cancelled`` writes ``<step_uuid> <pid>`` to ``$CANCELS_DIR/started`` and waits
for ``ctx.cancelled`` (at most a minute: far past what the test allows); when it sees it, it
writes the wall-clock time (``time.time()``, comparable across the test's processes) and its
pid to ``$CANCELS_DIR/seen``, then returns a result the commit must reject.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from duplex import StepContext, step_handler

DIR_ENV = "CANCELS_DIR"


def _write(path: Path, text: str) -> None:
    # Written whole, then renamed: the test never reads half a line.
    partial = path.with_suffix(".tmp")
    partial.write_text(text)
    partial.rename(path)


@step_handler("cancels.until_cancelled")
def until_cancelled(ctx: StepContext) -> dict[str, bool]:
    directory = Path(os.environ[DIR_ENV])
    _write(directory / "started", f"{ctx.step_uuid} {os.getpid()}\n")
    if ctx.cancelled.wait(60):
        _write(directory / "seen", f"{time.time()!r} {os.getpid()}\n")
    return {"late": True}
