"""Step handlers for ``tests/e2e/test_workflow_e2e.py``, run inside ``duplex run`` subprocesses.

Every handler appends ``<step name> <attempt>`` to the file named by ``$WF_RUN_LOG`` as it
starts, so a test can tell which steps really ran, how often, and in which order.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from duplex import PermanentError, RetryableError, StepContext, step_handler

RUN_LOG_ENV = "WF_RUN_LOG"

_lock = threading.Lock()


def _record_start(ctx: StepContext) -> None:
    path = os.environ.get(RUN_LOG_ENV)
    if path:
        with _lock, open(path, "a", encoding="utf-8") as log:
            log.write(f"{ctx.step_name} {ctx.attempt}\n")


def _result(ctx: StepContext) -> dict[str, Any]:
    return {
        "step": ctx.step_name,
        "attempt": ctx.attempt,
        "parents": {name: ctx.dependency_results[name] for name in sorted(ctx.dependency_results)},
    }


@step_handler("wf.echo")
def echo(ctx: StepContext) -> dict[str, Any]:
    """Succeed, returning the step name and the parents' results it was given."""
    _record_start(ctx)
    return _result(ctx)


@step_handler("wf.fail")
def fail(ctx: StepContext) -> dict[str, Any]:
    """Fail for good."""
    _record_start(ctx)
    raise PermanentError(f"{ctx.step_name} always fails")


@step_handler("wf.fail_first")
def fail_first(ctx: StepContext) -> dict[str, Any]:
    """Fail for good on the first attempt, succeed on any later one (after `duplex retry`)."""
    _record_start(ctx)
    if ctx.attempt == 1:
        raise PermanentError(f"{ctx.step_name} fails on its first attempt")
    return _result(ctx)


@step_handler("wf.gate")
def gate(ctx: StepContext) -> dict[str, Any]:
    """Touch ``<gate_dir>/<step>.started``, wait for ``<gate_dir>/release``, then end.

    ``inputs.outcome = "retryable"`` ends with a RetryableError instead of a result.
    """
    _record_start(ctx)
    gate_dir = Path(ctx.task_context["gate_dir"])
    (gate_dir / f"{ctx.step_name}.started").touch()
    deadline = time.monotonic() + 30
    while not (gate_dir / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    if ctx.inputs.get("outcome") == "retryable":
        raise RetryableError(f"{ctx.step_name} asks for a retry", retry_after=0)
    return _result(ctx)
