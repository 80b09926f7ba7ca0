"""What a step of each kind stores in ``workflow_steps.spec``, and when a wait ends.

Written at submission from the validated template, read back at run time by the commit (a
decision's branches, a batch's item step) and by the waits (a signal's name, a timeout, a
sleep's length), so that no worker needs the template file. Plain code, no SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from duplex.dynamic.kinds import BATCH, DECISION, SLEEP, WAIT
from duplex.messages import JSONDict

if TYPE_CHECKING:
    from duplex.templates import StepTemplate, TaskTemplate


def step_spec(step: StepTemplate, template: TaskTemplate, task_priority: int | None) -> Any:
    """The ``spec`` JSON of ``step`` (None for a handler step)."""
    if step.kind == DECISION:
        return {"branches": list(step.branches)}
    if step.kind in (WAIT, SLEEP):
        return _wait_spec(step)
    if step.kind == BATCH:
        worker = next(s for s in template.steps if s.name == step.worker)
        return {
            "worker": {
                "name": worker.name,
                "handler": worker.handler,
                "max_attempts": worker.max_attempts,
                "retryable": worker.retryable,
                "timeout_ms": worker.timeout_ms,
                "inputs": worker.inputs,
                "declared_events": [e.model_dump() for e in worker.events],
                "priority": template.step_priority(worker, task_priority),
                "retry_policy": None if worker.retry is None else worker.retry.stored(),
                "concurrency": None
                if worker.concurrency is None
                else worker.concurrency.model_dump(),
                "rate_limit": None if worker.rate_limit is None else worker.rate_limit.model_dump(),
            },
            # The steps that wait for every item (the batch's convergence).
            "convergence": [s.name for s in template.steps if worker.name in s.depends_on],
        }
    return None


def _wait_spec(step: StepTemplate) -> JSONDict:
    if step.kind == WAIT:
        return {"signal": step.signal, "timeout_ms": step.timeout_ms}
    assert step.duration is not None  # the template's validation requires it
    return {"duration_ms": round(step.duration.total_seconds() * 1000)}


@dataclass(frozen=True, slots=True)
class WaitUntil:
    """When a wait or sleep step that starts now ends by itself (None: only a signal ends
    it), and the reason its ``waiting`` transition row gives."""

    at: datetime | None
    reason: str


def wait_until(kind: str, spec: JSONDict | None, start: datetime) -> WaitUntil | None:
    """For a wait or sleep step starting at ``start``: when it ends by itself; None for any
    other kind."""
    spec = spec or {}
    if kind == SLEEP:
        end = start + timedelta(milliseconds=int(spec.get("duration_ms") or 0))
        return WaitUntil(end, f"sleeping until {end.isoformat()}")
    if kind == WAIT:
        timeout = spec.get("timeout_ms")
        signal = spec.get("signal")
        if timeout is None:
            return WaitUntil(None, f"waiting for signal {signal}")
        end = start + timedelta(milliseconds=int(timeout))
        return WaitUntil(end, f"waiting for signal {signal} until {end.isoformat()}")
    return None


def first_wait_until(step: StepTemplate, start: datetime) -> WaitUntil | None:
    """``wait_until`` for a template step that is a root, starting with its task."""
    if step.kind not in (WAIT, SLEEP):
        return None
    return wait_until(step.kind, _wait_spec(step), start)
