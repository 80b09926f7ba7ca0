"""Handlers for the observability end-to-end tests (``tests/test_observability_e2e.py``).

``ops.outcome`` ends as ``inputs.outcome`` says, so a run has known outcomes to count:
``ok``; ``permanent`` (PermanentError); ``error`` (ValueError: handler_error); ``flaky``
(RetryableError on the first attempt, then ok); ``hang`` (waits for its cancellation, i.e.
runs into its timeout). ``ops.log`` writes ``inputs.lines`` lines through ``ctx.logger``,
pausing between them so that concurrent steps interleave.
"""

from __future__ import annotations

from typing import Any

from app import PermanentError, RetryableError, StepContext, step_handler


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
    return {"kind": kind, "attempt": ctx.attempt}


@step_handler("ops.log")
def log(ctx: StepContext) -> dict[str, Any]:
    lines = int(ctx.inputs.get("lines", 5))
    for i in range(lines):
        ctx.logger.info("ops.log {} line {}", ctx.step_name, i)
        ctx.cancelled.wait(0.02)
    return {"lines": lines}
