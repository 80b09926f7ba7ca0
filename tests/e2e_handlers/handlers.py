"""Step handlers for the CLI end-to-end tests; they run inside a ``duplex run`` subprocess.

Each handler appends ``<step_uuid> <attempt>`` to the file named by ``$E2E_RUN_LOG`` (when
set) as it starts, so a test can count how often every step's handler really ran.
``e2e.gate`` holds its step until the file ``inputs.gate`` exists (``gates.py``).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from duplex import StepContext, step_handler
from tests.e2e_handlers.gates import wait_at_gate

RUN_LOG_ENV = "E2E_RUN_LOG"

_lock = threading.Lock()
_running = 0
_peak = 0


def _record_start(ctx: StepContext) -> None:
    path = os.environ.get(RUN_LOG_ENV)
    if not path:
        return
    with _lock, open(path, "a", encoding="utf-8") as log:
        log.write(f"{ctx.step_uuid} {ctx.attempt}\n")
        log.flush()


@step_handler("e2e.echo")
def echo(ctx: StepContext) -> dict[str, Any]:
    """Return the step's name and the names of the parents whose results it saw."""
    _record_start(ctx)
    ctx.emit("e2e.echoed", {"step": ctx.step_name})
    return {"step": ctx.step_name, "parents": sorted(ctx.dependency_results)}


@step_handler("e2e.sleep")
def sleep(ctx: StepContext) -> dict[str, Any]:
    """Sleep ``inputs.seconds`` (default 0.3), waking early only when cancelled."""
    _record_start(ctx)
    seconds = float(ctx.inputs.get("seconds", 0.3))
    ctx.cancelled.wait(seconds)
    return {"step": ctx.step_name, "slept": seconds}


@step_handler("e2e.gate")
def gate(ctx: StepContext) -> dict[str, Any]:
    """Wait until the file ``inputs.gate`` exists, then succeed."""
    _record_start(ctx)
    wait_at_gate(ctx, str(ctx.inputs["gate"]))
    return {"step": ctx.step_name}


@step_handler("e2e.gather")
def gather(ctx: StepContext) -> dict[str, Any]:
    """Report how many handlers of this kind ran at once in this process.

    Each call waits (up to ``inputs.wait_s``) until ``inputs.gather`` calls are running, then
    lingers ``inputs.linger_s`` so that any call beyond the limit would overlap and be seen.
    """
    global _running, _peak
    _record_start(ctx)
    target = int(ctx.inputs.get("gather", 2))
    deadline = time.monotonic() + float(ctx.inputs.get("wait_s", 5.0))
    with _lock:
        _running += 1
        _peak = max(_peak, _running)
    try:
        while time.monotonic() < deadline:
            with _lock:
                if _running >= target:
                    break
            time.sleep(0.01)
        time.sleep(float(ctx.inputs.get("linger_s", 0.2)))
        with _lock:
            peak = _peak
    finally:
        with _lock:
            _running -= 1
    return {"step": ctx.step_name, "peak": peak}
