"""Handlers for the browser tests of the dashboard (``tests/dashboard/test_dashboard_browser.py``).

``browser.gate`` holds its step until the file ``$BROWSER_GATES/<task context "gate">``
exists, so a test decides when a workflow may go on, without timing guesses.
``browser.fail_first`` fails for good (``PermanentError``) on attempt 1 and succeeds on any
later attempt, i.e. once an operator retried it; a later attempt first waits at the gate named
by the task context's ``"retry_gate"``. ``browser.broken`` always fails for good.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from duplex import PermanentError, StepContext, step_handler

GATES_ENV = "BROWSER_GATES"
# A gate never holds a step for longer than this, so a test that forgot one cannot hang.
GATE_LIMIT_S = 60.0


def _wait_at_gate(ctx: StepContext, key: str) -> Any:
    name = ctx.task_context.get(key)
    if name:
        path = Path(os.environ[GATES_ENV]) / str(name)
        deadline = time.monotonic() + GATE_LIMIT_S
        while not path.exists() and time.monotonic() < deadline:
            if ctx.cancelled.wait(0.02):
                break
    return name


@step_handler("browser.gate")
def gate(ctx: StepContext) -> dict[str, Any]:
    return {"step": ctx.step_name, "gate": _wait_at_gate(ctx, "gate")}


@step_handler("browser.fail_first")
def fail_first(ctx: StepContext) -> dict[str, Any]:
    if ctx.attempt == 1:
        raise PermanentError("fails on its first attempt, on purpose")
    _wait_at_gate(ctx, "retry_gate")
    return {"step": ctx.step_name, "attempt": ctx.attempt}


@step_handler("browser.broken")
def broken(ctx: StepContext) -> dict[str, Any]:
    raise PermanentError("broken on purpose: resolve me by hand")
