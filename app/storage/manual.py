"""Finishing a step by hand (``duplex resolve``, ``duplex complete``): the writes, once the
operator command (``duplex.storage.operations``) locked the task and checked the move.

The step's row and transition, then the task moved on exactly as after a result
(``advance``): dependents made ready, a wait or sleep after the step started (and completed at
once when its signal is already in), the events of a step completed by hand (as a wait step's:
``step.completed`` and its declared success events), and the task state brought up to date.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, Row, select, update

from duplex.messages import DomainEvent, JSONDict
from duplex.states import PENDING
from duplex.storage.driver import db_time
from duplex.storage.events import EventLog, wait_events
from duplex.storage.models import workflow_steps
from duplex.storage.transitions import transition_row
from duplex.storage.waits import finish_moves

ws = workflow_steps


class Moved(NamedTuple):
    """One step a command moved: the one it finished, or one the task moved on to."""

    step_uuid: str
    name: str
    from_state: str
    to_state: str


def finish_by_hand(
    conn: Connection,
    step: Row[Any],
    to_state: str,
    result: JSONDict | None,
    *,
    operator: str,
    now: datetime,
    why: str,
) -> tuple[list[Moved], list[DomainEvent]]:
    """Move the locked ``step`` (a row with step_uuid, task_uuid, name, state, attempts,
    declared_events) to ``to_state``, with ``result`` as its result if given; return every
    step moved, this one first, and the events written."""
    values: dict[str, Any] = {"state": to_state, "next_attempt_at": None}
    if result is not None:
        values["results"] = result
    conn.execute(
        update(ws)
        .where(ws.c.step_uuid == step.step_uuid, ws.c.state == step.state)
        .values(**values, completed_at=now, updated_at=now)
    )
    at = db_time(conn.dialect, now)
    moves = [transition_row(step.step_uuid, step.state, to_state, step.attempts, operator, at, why)]
    log = EventLog(conn, [step.task_uuid], now=now, at=at)
    if result is not None:
        for name, payload in wait_events(step.name, result, step.declared_events):
            log.add(name, step.task_uuid, step.step_uuid, payload)
    progress = finish_moves(
        conn,
        log,
        moves,
        completed=[step.step_uuid],
        tasks=[step.task_uuid],
        now=now,
        worker_id=operator,
    )
    # A wait the task moved on to may have moved twice (started, then completed by a signal
    # already in): one change each, from where it was to where it is.
    later: dict[str, tuple[str, str]] = {}
    for step_uuid, from_state, to_state_, *_ in progress.transitions:
        first = later.get(step_uuid, (from_state or PENDING, to_state_))[0]
        later[step_uuid] = (first, to_state_)
    names: dict[str, str] = {}
    if later:
        query = select(ws.c.step_uuid, ws.c.name).where(ws.c.step_uuid.in_(sorted(later)))
        names = {row.step_uuid: row.name for row in conn.execute(query)}
    moved = [Moved(step.step_uuid, step.name, step.state, to_state)]
    moved.extend(Moved(s, names[s], first, last) for s, (first, last) in later.items())
    return moved, log.events
