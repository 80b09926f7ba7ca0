"""Handlers for the concurrency-key tests (``tests/e2e/test_concurrency_keys_e2e.py``).

They run inside ``duplex run`` subprocesses and read what to do from the task's context, so
that one template per key serves every task of that key.

* ``keyed.sleep`` sleeps ``context.ms`` milliseconds.
* ``keyed.block`` waits until the file named by ``$KEYED_RELEASE`` exists (at most
  ``BLOCK_LIMIT_S``, so a test that forgot to release it cannot hang).
"""

from __future__ import annotations

import os
import time
from typing import Any

from duplex import StepContext, step_handler

RELEASE_ENV = "KEYED_RELEASE"
BLOCK_LIMIT_S = 30.0


@step_handler("keyed.sleep")
def sleep(ctx: StepContext) -> dict[str, Any]:
    """Sleep ``context.ms`` milliseconds."""
    ms = int(ctx.task_context.get("ms", 0))
    time.sleep(ms / 1000)
    return {"slept_ms": ms, "pid": os.getpid()}


@step_handler("keyed.block")
def block(ctx: StepContext) -> dict[str, Any]:
    """Wait until ``$KEYED_RELEASE`` exists."""
    release = os.environ.get(RELEASE_ENV, "")
    deadline = time.monotonic() + BLOCK_LIMIT_S
    while not (release and os.path.exists(release)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"released": bool(release and os.path.exists(release)), "pid": os.getpid()}
