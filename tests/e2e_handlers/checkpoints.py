"""Handlers for the checkpoint end-to-end tests (``tests/e2e/test_checkpoint_e2e.py``); they run
inside ``duplex run`` subprocesses.

``checkpoints.resumable`` counts to ``inputs.k``, saving ``{"i": n}`` after each count and
starting from the last accepted checkpoint. Its first attempt, once it saved ``k``, writes
``<step_uuid> <attempt> <pid>`` to ``$CHECKPOINTS_DIR/saved`` and then waits at the gate
``$CHECKPOINTS_DIR/release`` (a test kills its process there, or opens the gate). Every
attempt returns the checkpoint it started from, so the test can see where it resumed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from duplex import StepContext, step_handler
from tests.e2e_handlers.gates import wait_at_gate

DIR_ENV = "CHECKPOINTS_DIR"


@step_handler("checkpoints.resumable")
def resumable(ctx: StepContext) -> dict[str, Any]:
    directory = Path(os.environ[DIR_ENV])
    started_from = ctx.checkpoint_state
    k = int(ctx.inputs["k"])
    start = int(started_from["i"]) if isinstance(started_from, dict) else 0
    for n in range(start + 1, k + 1):
        ctx.checkpoint({"i": n})
    if ctx.attempt == 1:
        # Written whole, then renamed: the test never reads half a line.
        marker = directory / "saved.tmp"
        marker.write_text(f"{ctx.step_uuid} {ctx.attempt} {os.getpid()}\n")
        marker.rename(directory / "saved")
        wait_at_gate(ctx, directory / "release")
    return {"started_from": started_from, "attempt": ctx.attempt, "pid": os.getpid()}
