"""Domain events of an applied outcome: what a handler emitted, the lifecycle events and the
template's declared events, in order.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert

from duplex.messages import (
    ClaimedStep,
    DeclaredEvent,
    DomainEvent,
    JSONDict,
    StepFailure,
    StepOutcome,
)
from duplex.states import (
    COMPLETE,
    ERROR,
    WAITING_FOR_RETRY,
)
from duplex.storage.driver import BulkStatement, db_json
from duplex.storage.listen import notify_new_events
from duplex.storage.models import (
    domain_events,
    workflow_steps,
)
from duplex.storage.outbox import next_sequences

ws = workflow_steps


class EventLog:
    """The domain events of one transaction: numbered in commit order per task, written as
    outbox rows together, announced (PostgreSQL NOTIFY) only when the transaction commits.

    Use it only with the tasks locked (``lock_tasks``): that is what makes the numbers follow
    commit order (``duplex.storage.outbox``).
    """

    def __init__(self, conn: Connection, tasks: Iterable[str], *, now: datetime, at: Any):
        self._conn = conn
        self._tasks = tasks
        self._now = now
        self._at = at
        self._sequences: dict[str, int] | None = None
        self.events: list[DomainEvent] = []
        self._rows: list[tuple[Any, ...]] = []

    def add(self, name: str, task_uuid: str, step_uuid: str | None, payload: JSONDict) -> None:
        if self._sequences is None:  # read only once there is an event to number
            self._sequences = next_sequences(self._conn, self._tasks)
        sequence = self._sequences.get(task_uuid, 0) + 1
        self._sequences[task_uuid] = sequence
        event = DomainEvent(
            str(uuid.uuid4()), name, task_uuid, step_uuid, payload, self._now, sequence
        )
        self.events.append(event)
        self._rows.append(
            (event.event_id, name, task_uuid, step_uuid, db_json(payload), self._at, sequence)
        )

    def write(self) -> list[DomainEvent]:
        """Insert the events added so far; return them (to publish after the commit)."""
        if self._rows:
            _INSERT_EVENTS.execute(self._conn, self._rows)
            notify_new_events(self._conn, self.events[-len(self._rows) :])
            self._rows = []
        return self.events


_EVENT_COLUMNS = (
    "event_id",
    "name",
    "task_uuid",
    "step_uuid",
    "payload",
    "created_at",
    "sequence",
)
_INSERT_EVENTS = BulkStatement(
    insert(domain_events).values(
        {name: bindparam(name, type_=domain_events.c[name].type) for name in _EVENT_COLUMNS}
    ),
    _EVENT_COLUMNS,
)


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


def wait_events(
    step_name: str,
    result: JSONDict | None,
    declared: Any,
    *,
    failure: StepFailure | None = None,
) -> list[tuple[str, JSONDict]]:
    """The events of a step that ran no handler (a wait or sleep step, or a step completed
    by hand): ``step.completed`` or ``step.failed``, then its declared events, as for an
    attempt (attempt 0, no handler)."""
    step = ClaimedStep(
        step_uuid="",
        task_uuid="",
        name=step_name,
        handler="",
        attempt=0,
        max_attempts=1,
        retryable=False,
        timeout_ms=None,
        claimed_by="",
        declared_events=declared_events(declared),
    )
    never = datetime.min
    if failure is not None:
        return events_of(StepOutcome(step, never, never, failure=failure), ERROR, None)
    return events_of(StepOutcome(step, never, never, result=result or {}), COMPLETE, None)
