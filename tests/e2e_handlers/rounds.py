"""A handler held until the test releases it, one step at a time (``tests/e2e/test_eager_e2e.py``).

``rounds.gated`` appends ``<step_uuid> <attempt> <pid>`` to ``$KILLS_RUN_LOG`` as it starts,
as the handlers of ``kills.py`` do, then waits until the file ``$ROUNDS_DIR/<step_uuid>`` or
``$ROUNDS_DIR/all`` exists. The test thereby runs the work in rounds: it waits until the
workers hold what they can, reads who holds what, and lets exactly those steps go.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from duplex import PermanentError, StepContext, step_handler
from tests.e2e_handlers.kills import RUN_LOG_ENV

ROUNDS_DIR_ENV = "ROUNDS_DIR"
# A step is never held longer than this, so a test that forgot one cannot hang.
HOLD_LIMIT_S = 120.0


@step_handler("rounds.gated")
def gated(ctx: StepContext) -> dict[str, Any]:
    """Record the start, then wait for this step's release (or everyone's)."""
    run_log = os.environ[RUN_LOG_ENV]
    fd = os.open(run_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # One write() on an O_APPEND file: lines from several processes never interleave.
        os.write(fd, f"{ctx.step_uuid} {ctx.attempt} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    released = Path(os.environ[ROUNDS_DIR_ENV])
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not (released / ctx.step_uuid).exists() and not (released / "all").exists():
        if time.monotonic() > deadline:
            raise PermanentError(f"step {ctx.step_uuid} was never released")
        time.sleep(0.01)
    return {"pid": os.getpid()}
