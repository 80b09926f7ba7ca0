"""Domain events of an applied outcome: what a handler emitted, the lifecycle events and the
template's declared events, in order.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from duplex.messages import (
    DeclaredEvent,
    JSONDict,
    StepOutcome,
)
from duplex.states import (
    WAITING_FOR_RETRY,
)
from duplex.storage.models import (
    workflow_steps,
)

ws = workflow_steps


def declared_events(raw: Any) -> tuple[DeclaredEvent, ...]:
    """Turn a step's stored ``declared_events`` JSON into declarations."""
    if not raw:  # most steps declare none: no generator for them
        return ()
    return tuple(DeclaredEvent(e["name"], e.get("condition", "success")) for e in raw or ())


def events_of(
    outcome: StepOutcome, new_state: str, next_at: datetime | None
) -> list[tuple[str, JSONDict]]:
    """List the domain events an applied outcome produces, in order.

    Events the handler emitted come first, then ``step.completed`` or ``step.failed``, then
    the template's declared events whose condition matches how the step ended.
    """
    step = outcome.step
    base: JSONDict = {"step_name": step.name, "handler": step.handler, "attempt": step.attempt}
    events: list[tuple[str, JSONDict]] = [(e.name, e.payload) for e in outcome.events]
    failure = outcome.failure
    if failure is None:
        events.append(("step.completed", base))
    else:
        events.append(
            (
                "step.failed",
                {
                    **base,
                    "error_type": failure.error_type,
                    "message": failure.message,
                    "retryable": failure.retryable,
                    "state": new_state,
                    "next_attempt_at": next_at.isoformat() if next_at else None,
                },
            )
        )
    if step.declared_events:
        events.extend(_declared(outcome, new_state, base))
    return events


def _declared(outcome: StepOutcome, new_state: str, base: JSONDict) -> list[tuple[str, JSONDict]]:
    """The template's declared events whose condition matches how the attempt ended."""
    failure = outcome.failure
    if failure is None:
        payload: JSONDict = {**base, "outcome": "success", "result": outcome.result}
        wanted: tuple[str, ...] = ("success", "always")
    else:
        payload = {
            **base,
            "outcome": "failure",
            "error_type": failure.error_type,
            "message": failure.message,
            "state": new_state,
        }
        # Declared failure events are about the step, not an attempt: a failure that will be
        # retried is not one (``step.failed`` reports every failed attempt).
        wanted = () if new_state == WAITING_FOR_RETRY else ("failure", "always")
    return [(d.name, payload) for d in outcome.step.declared_events if d.condition in wanted]
