"""Ending waits by time: a sleep when its duration has passed, a wait when its timeout has.

A ``waiting`` step carries in ``next_attempt_at`` when it ends by itself (NULL: only a signal
ends it). The periodic sweep of every worker (``Committer.sweep_waits``, as often as the
deadline sweep: ``worker.deadline_sweep_interval_ms``) reads the due ones (``find_due_waits``,
no lock), then ends them in one write transaction (``end_due_waits``):

* a sleep becomes ``complete`` with the result ``{}``, and its dependents go on (``advance``);
* a wait becomes ``error`` with ``error_type = wait_timeout``, not retryable (``duplex retry``
  makes it wait once more, ``duplex.storage.operations``).

Each locks the task rows first (the order of every writer, see ``duplex.storage.results``) and
checks each step again under the lock, so a wait that a signal completed meanwhile, or that
another worker's sweep ended, is left alone: a wait ends exactly once however many race.

``finish_moves`` is the tail every writer of a step that ran no handler shares (this module,
``duplex.storage.signals``, ``duplex complete``): move the task on, write the transition rows
and the events, bring the task states up to date.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, Integer, bindparam, select, text, update

from duplex.dynamic.kinds import SLEEP
from duplex.errors import WAIT_TIMEOUT
from duplex.messages import DomainEvent, JSONDict, StepFailure
from duplex.states import COMPLETE, ERROR, WAITING
from duplex.storage.driver import db_time
from duplex.storage.events import EventLog, wait_events
from duplex.storage.expansion import Progress, advance
from duplex.storage.models import WAITING_WITH_END, unindexed, workflow_steps
from duplex.storage.readiness import ReadyStep
from duplex.storage.task_state import lock_tasks, update_task_states
from duplex.storage.transitions import TransitionRow, insert_transitions, transition_row

__all__ = ["EndedWait", "WaitsReport", "end_due_waits", "find_due_waits", "finish_moves"]

ws = workflow_steps


@dataclass(frozen=True, slots=True)
class EndedWait:
    """One wait or sleep step the sweep ended."""

    step_uuid: str
    task_uuid: str
    name: str
    kind: str
    state: str  # complete (a sleep) or error (a wait's timeout)


@dataclass
class WaitsReport:
    """What one sweep transaction did, and the events to announce after its commit."""

    ended: list[EndedWait] = field(default_factory=list)
    ready: list[ReadyStep] = field(default_factory=list)
    events: list[DomainEvent] = field(default_factory=list)


def find_due_waits(conn: Connection, *, now: datetime, limit: int = 200) -> list[str]:
    """Return up to ``limit`` waiting steps whose end has come by ``now``, earliest first.

    A read: the sweep runs every second on every worker, and on SQLite a write transaction
    with nothing to write would hold up every commit.
    """
    return list(conn.execute(_DUE, {"now": now, "limit": limit}).scalars())


# Served by the partial index ``ix_workflow_steps_waiting_until``: its predicate is repeated
# as text so that both databases see the index covers the query.
_DUE = (
    select(ws.c.step_uuid)
    .where(
        text(WAITING_WITH_END),
        ws.c.next_attempt_at <= bindparam("now", type_=ws.c.next_attempt_at.type),
    )
    .order_by(ws.c.next_attempt_at)
    .limit(bindparam("limit", type_=Integer))
)


def end_due_waits(
    conn: Connection, step_uuids: Iterable[str], *, now: datetime, worker_id: str
) -> WaitsReport:
    """End those of ``step_uuids`` that are still waiting and due by ``now``, inside the
    caller's write transaction (see the module docstring)."""
    report = WaitsReport()
    ids = sorted(set(step_uuids))
    if not ids:
        return report
    task_ids = conn.execute(_TASKS_OF, {"ids": ids}).scalars().all()
    lock_tasks(conn, task_ids)
    query = _DUE_AGAIN.with_for_update() if conn.dialect.name == "postgresql" else _DUE_AGAIN
    rows = list(conn.execute(query, {"ids": ids, "now": now}))
    if not rows:
        return report
    at = db_time(conn.dialect, now)
    log = EventLog(conn, sorted({row.task_uuid for row in rows}), now=now, at=at)
    transitions: list[TransitionRow] = []
    slept: list[str] = []
    for row in rows:
        ends_at = row.next_attempt_at.isoformat()
        if row.kind == SLEEP:
            conn.execute(
                _END,
                {
                    "b_step_uuid": row.step_uuid,
                    "v_state": COMPLETE,
                    "v_now": now,
                    "v_results": {},
                    "v_error": None,
                },
            )
            why, state, failure = f"slept until {ends_at}", COMPLETE, None
            slept.append(row.step_uuid)
        else:
            signal = (row.spec or {}).get("signal")
            failure = StepFailure(
                WAIT_TIMEOUT, f"signal {signal} did not come by {ends_at}", retryable=False
            )
            conn.execute(
                _END,
                {
                    "b_step_uuid": row.step_uuid,
                    "v_state": ERROR,
                    "v_now": now,
                    "v_results": None,
                    "v_error": failure.as_json(),
                },
            )
            why, state = f"{WAIT_TIMEOUT}: signal {signal} did not come by {ends_at}", ERROR
        transitions.append(
            transition_row(row.step_uuid, WAITING, state, row.attempts, worker_id, at, why)
        )
        result: JSONDict | None = {} if failure is None else None
        for name, payload in wait_events(row.name, result, row.declared_events, failure=failure):
            log.add(name, row.task_uuid, row.step_uuid, payload)
        report.ended.append(EndedWait(row.step_uuid, row.task_uuid, row.name, row.kind, state))
    progress = finish_moves(
        conn, log, transitions, completed=slept, tasks=task_ids, now=now, worker_id=worker_id
    )
    report.ready = progress.ready
    report.events = log.events
    return report


_TASKS_OF = select(ws.c.task_uuid).where(ws.c.step_uuid.in_(bindparam("ids", expanding=True)))
_DUE_AGAIN = (
    select(
        ws.c.step_uuid,
        ws.c.task_uuid,
        ws.c.name,
        ws.c.kind,
        ws.c.spec,
        ws.c.attempts,
        ws.c.declared_events,
        ws.c.next_attempt_at,
    )
    .where(
        ws.c.step_uuid.in_(bindparam("ids", expanding=True)),
        unindexed(ws.c.state) == WAITING,
        ws.c.next_attempt_at <= bindparam("now", type_=ws.c.next_attempt_at.type),
    )
    .order_by(ws.c.step_uuid)
)
_NOW = bindparam("v_now", type_=ws.c.updated_at.type)
# Guarded by state again, as on every other writer of step states.
_END = (
    update(ws)
    .where(ws.c.step_uuid == bindparam("b_step_uuid"), unindexed(ws.c.state) == WAITING)
    .values(
        state=bindparam("v_state"),
        results=bindparam("v_results", type_=ws.c.results.type),
        error=bindparam("v_error", type_=ws.c.error.type),
        next_attempt_at=None,
        completed_at=_NOW,
        updated_at=_NOW,
    )
)


def finish_moves(
    conn: Connection,
    log: EventLog,
    transitions: list[TransitionRow],
    *,
    completed: Sequence[str],
    tasks: Iterable[str],
    now: datetime,
    worker_id: str | None,
) -> Progress:
    """With the tasks locked and the finished steps' rows written: move the tasks on from the
    ``completed`` steps (``advance``), then write the transition rows and the events of
    ``log`` (with those of waits a stored signal completed on the way), and bring the tasks'
    states up to date. Returns what ``advance`` did."""
    progress = advance(conn, completed=completed, now=now, worker_id=worker_id)
    transitions.extend(_by(row, worker_id) for row in progress.transitions)
    for wait in progress.signalled:
        for name, payload in wait_events(wait.name, wait.result, wait.declared_events):
            log.add(name, wait.task_uuid, wait.step_uuid, payload)
    insert_transitions(conn, transitions)
    log.write()
    update_task_states(conn, tasks, now=now)
    return progress


def _by(row: TransitionRow, worker_id: str | None) -> TransitionRow:
    """``advance`` leaves ``worker_id`` empty on the moves it makes: they are this writer's."""
    step_uuid, from_state, to_state, attempt, who, at, reason = row
    return (step_uuid, from_state, to_state, attempt, who or worker_id, at, reason)
