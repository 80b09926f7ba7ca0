"""Handlers for the observability end-to-end tests (``tests/e2e/test_observability_e2e.py``).

``ops.outcome`` ends as ``inputs.outcome`` says, so a run has known outcomes to count:
``ok``; ``permanent`` (PermanentError); ``error`` (ValueError: handler_error); ``flaky``
(RetryableError on the first attempt, then ok); ``hang`` (waits for its cancellation, i.e.
runs into its timeout); ``sleep`` (``inputs.seconds``); ``gate`` (runs until the file
``inputs.gate`` exists: as long as the test needs a step running, see ``gates.py``).
``ops.log`` writes ``inputs.lines`` lines through ``ctx.logger``; with ``inputs.lockstep =
N`` the N steps of a task write them in rounds, each writing its line i only once every one
has written line i - 1, so their lines always interleave.
"""

from __future__ import annotations

import threading
from typing import Any

from duplex import PermanentError, RetryableError, StepContext, step_handler
from tests.e2e_handlers.gates import GATE_LIMIT_S, wait_at_gate


@step_handler("ops.outcome")
def outcome(ctx: StepContext) -> dict[str, Any]:
    kind = ctx.inputs.get("outcome", "ok")
    if kind == "permanent":
        raise PermanentError("declined on purpose")
    if kind == "error":
        raise ValueError("a bug on purpose")
    if kind == "flaky" and ctx.attempt == 1:
        raise RetryableError("busy on purpose", retry_after=0.05)
    if kind == "hang":
        ctx.cancelled.wait(30)
    if kind == "sleep":
        ctx.cancelled.wait(float(ctx.inputs.get("seconds", 1.0)))
    if kind == "gate":
        wait_at_gate(ctx, str(ctx.inputs["gate"]))
    return {"kind": kind, "attempt": ctx.attempt}


_barriers: dict[str, threading.Barrier] = {}
_barriers_lock = threading.Lock()


def _barrier(task_uuid: str, parties: int) -> threading.Barrier:
    with _barriers_lock:
        return _barriers.setdefault(task_uuid, threading.Barrier(parties, timeout=GATE_LIMIT_S))


@step_handler("ops.log")
def log(ctx: StepContext) -> dict[str, Any]:
    lines = int(ctx.inputs.get("lines", 5))
    parties = int(ctx.inputs.get("lockstep", 0))
    barrier = _barrier(ctx.task_uuid, parties) if parties else None
    for i in range(lines):
        if barrier is not None:
            barrier.wait()  # every step has written line i - 1
        ctx.logger.info("ops.log {} line {}", ctx.step_name, i)
        ctx.cancelled.wait(0.02)
    return {"lines": lines}
