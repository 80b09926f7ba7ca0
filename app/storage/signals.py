"""Signals: what ``Client.signal`` and ``duplex signal TASK NAME`` write.

A wait step (``kind = "wait"``, ``signal = "NAME"``) runs no handler: the signal ``NAME`` sent
to its task completes it, with the payload as its result (a JSON object is the result; any
other JSON value is stored as ``{"payload": value}``), and its dependents go on, in the one
transaction that stores the signal (``send_signal``). Every signal is a ``step_signals`` row.

* Sent before the wait started (the step still ``pending``): the row is kept unused, and the
  wait uses it the moment it starts (``duplex.storage.expansion.advance``).
* The same ``signal_id`` twice (a sender retrying): the second changes nothing and says so
  (``already received``); it is not an error, whatever the step became meanwhile.
* Refused, with one line and nothing written: an unknown task, a cancelled task, a name no
  wait step of the task waits for, a wait that already finished (complete, error, skipped,
  cancelled, resolved), and a second, different signal for a wait that has not started and
  already holds an unused one (which of the two it should use would be a guess).

The task row is locked first (the order of every writer, see ``duplex.storage.results``), so
two signals for one task, or a signal and the sweep ending the same wait, act one at a time.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, bindparam, insert, select

from duplex.dynamic.kinds import WAIT
from duplex.errors import InputError, TransitionError
from duplex.messages import DomainEvent, JSONDict
from duplex.states import COMPLETE, PENDING, TASK_CANCELLED, WAITING
from duplex.storage.driver import db_time
from duplex.storage.events import EventLog, wait_events
from duplex.storage.expansion import complete_wait
from duplex.storage.models import step_signals, tasks, workflow_steps
from duplex.storage.queries import parse_uuid
from duplex.storage.task_state import lock_tasks
from duplex.storage.transitions import transition_row
from duplex.storage.waits import finish_moves

__all__ = ["COMPLETED", "DUPLICATE", "STORED", "SignalReport", "send_signal", "signal_result"]

ws = workflow_steps
sig = step_signals

# What a signal did.
COMPLETED = "completed"  # it completed its waiting step
STORED = "stored"  # kept for a wait that has not started
DUPLICATE = "duplicate"  # its signal_id was received before: nothing changed

MAX_SIGNAL_ID = 255  # step_signals.signal_id


@dataclass(frozen=True, slots=True)
class SignalReport:
    """What one signal did."""

    outcome: str  # COMPLETED, STORED or DUPLICATE
    task_uuid: str
    name: str
    signal_id: str
    step_uuid: str | None
    step_name: str | None
    task_state: str
    # The handler steps it made ready (names), and their namespaces (to wake their workers).
    made_ready: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    events: tuple[DomainEvent, ...] = ()

    @property
    def summary(self) -> str:
        """One line saying what the signal did: what ``duplex signal`` prints."""
        if self.outcome == DUPLICATE:
            return (
                f"signal {self.name} (id {self.signal_id}) already received for task "
                f"{self.task_uuid}; nothing changed"
            )
        if self.outcome == STORED:
            return (
                f"signal {self.name} (id {self.signal_id}) stored for task {self.task_uuid}: "
                f"step {self.step_name} has not started waiting; it will use it when it does"
            )
        line = f"signal {self.name} completed step {self.step_name} ({self.step_uuid})"
        if self.made_ready:
            line += f"; enqueued {', '.join(self.made_ready)}"
        return f"{line}; task {self.task_uuid} is {self.task_state}"


def signal_result(payload: Any) -> JSONDict:
    """The result a signal's payload gives its wait step."""
    return payload if isinstance(payload, dict) else {"payload": payload}


def send_signal(
    conn: Connection,
    task_uuid: str,
    name: str,
    payload: Any,
    *,
    signal_id: str | None,
    sent_by: str,
    now: datetime,
) -> SignalReport:
    """Deliver the signal ``name`` to a task inside the caller's write transaction (see the
    module docstring); ``signal_id`` None: a new one. Raises ``InputError`` or
    ``TransitionError`` before writing anything when the signal is refused."""
    task_id = parse_uuid(task_uuid, "task")
    _check_input(name, payload, signal_id)
    signal_id = signal_id if signal_id is not None else str(uuid.uuid4())
    state = lock_tasks(conn, [task_id]).get(task_id)
    if state is None:
        raise InputError(f"unknown task: {task_uuid}")
    before = conn.execute(_SIGNAL_BY_ID, {"task_uuid": task_id, "signal_id": signal_id}).first()
    if before is not None:
        if before.name != name:
            raise InputError(
                f"signal id {signal_id} was already used for signal {before.name} of task {task_id}"
            )
        return SignalReport(DUPLICATE, task_id, name, signal_id, before.step_uuid, None, state)
    refused = f"signal {name} refused for task {task_id}"
    if state == TASK_CANCELLED:
        raise TransitionError(f"{refused}: the task is cancelled")
    step = _wait_step(conn, task_id, name, refused)
    if step.state not in (PENDING, WAITING):
        raise TransitionError(f"{refused}: its wait step {step.name!r} is already {step.state}")
    if step.state == PENDING:
        held = conn.execute(_UNUSED, {"task_uuid": task_id, "name": name}).first()
        if held is not None:
            raise TransitionError(
                f"{refused}: signal id {held.signal_id} is already stored for step "
                f"{step.name!r}, which has not started waiting"
            )
    row = {
        "task_uuid": task_id,
        "name": name,
        "signal_id": signal_id,
        "payload": payload,
        "received_at": now,
        "sent_by": sent_by,
    }
    stored_id = conn.execute(insert(sig).values(row).returning(sig.c.id)).scalar_one()
    if step.state == PENDING:
        return SignalReport(STORED, task_id, name, signal_id, step.step_uuid, step.name, state)

    result = signal_result(payload)
    complete_wait(conn, step.step_uuid, stored_id, result, now=now)
    at = db_time(conn.dialect, now)
    log = EventLog(conn, [task_id], now=now, at=at)
    for event, body in wait_events(step.name, result, step.declared_events):
        log.add(event, task_id, step.step_uuid, body)
    why = f"signal {name} received (id {signal_id})"
    moves = [transition_row(step.step_uuid, WAITING, COMPLETE, step.attempts, sent_by, at, why)]
    progress = finish_moves(
        conn, log, moves, completed=[step.step_uuid], tasks=[task_id], now=now, worker_id=sent_by
    )
    ready = [r.step_uuid for r in progress.ready]
    query = select(ws.c.step_uuid, ws.c.name).where(ws.c.step_uuid.in_(ready))
    names = {row.step_uuid: row.name for row in conn.execute(query)}
    return SignalReport(
        COMPLETED,
        task_id,
        name,
        signal_id,
        step.step_uuid,
        step.name,
        str(conn.execute(_TASK_STATE, {"task_uuid": task_id}).scalar_one()),
        made_ready=tuple(names[r] for r in ready),
        namespaces=tuple(sorted({r.namespace for r in progress.ready})),
        events=tuple(log.events),
    )


def _check_input(name: Any, payload: Any, signal_id: Any) -> None:
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"a signal name must be a non-empty string, not {name!r:.80}")
    if signal_id is not None and (
        not isinstance(signal_id, str) or not signal_id.strip() or len(signal_id) > MAX_SIGNAL_ID
    ):
        raise InputError(
            f"a signal id must be a non-empty string of at most {MAX_SIGNAL_ID} characters, "
            f"not {signal_id!r:.80}"
        )
    try:
        # NaN and Infinity are not JSON, and PostgreSQL refuses them.
        json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InputError(f"a signal payload must be JSON: {exc}") from None


def _wait_step(conn: Connection, task_id: str, name: str, refused: str) -> Row[Any]:
    """The wait step of the task that waits for ``name`` (locked on PostgreSQL)."""
    query = _WAIT_STEPS.with_for_update() if conn.dialect.name == "postgresql" else _WAIT_STEPS
    steps: list[Row[Any]] = list(conn.execute(query, {"task_uuid": task_id}))
    for step in steps:
        if (step.spec or {}).get("signal") == name:
            return step
    waited = sorted({str((s.spec or {}).get("signal")) for s in steps})
    hint = f"it waits for {', '.join(waited)}" if waited else "it has no wait step"
    raise InputError(f"{refused}: no wait step waits for it ({hint})")


_SIGNAL_BY_ID = select(sig.c.name, sig.c.step_uuid).where(
    sig.c.task_uuid == bindparam("task_uuid"), sig.c.signal_id == bindparam("signal_id")
)
_UNUSED = (
    select(sig.c.signal_id)
    .where(
        sig.c.task_uuid == bindparam("task_uuid"),
        sig.c.name == bindparam("name"),
        sig.c.used_at.is_(None),
    )
    .limit(1)
)
_WAIT_STEPS = (
    select(
        ws.c.step_uuid,
        ws.c.name,
        ws.c.state,
        ws.c.spec,
        ws.c.attempts,
        ws.c.declared_events,
    )
    .where(ws.c.task_uuid == bindparam("task_uuid"), ws.c.kind == WAIT)
    .order_by(ws.c.position)
)
_TASK_STATE = select(tasks.c.state).where(tasks.c.task_uuid == bindparam("task_uuid"))
