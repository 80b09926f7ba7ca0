"""Committing attempt outcomes: the orchestration step of Duplex, in one transaction per batch.

For each outcome the step row is updated under a guard (still ``in_progress``, same attempt,
same claimant), so a late or duplicate result is rejected, never applied twice. In the same
transaction: the transition row, the domain events (outbox rows), dependents made ready and
task states brought up to date. Events are returned to be published only after the commit.

Every writer that changes what may run next in a task (this module, releases of claims, the
operator commands) first locks the task rows, in task-uuid order (``lock_tasks``). On
PostgreSQL under READ COMMITTED this is what makes readiness correct: without it, two workers
committing the last two parents of a step at once could each still see the other parent
running, and the child would never be enqueued. It also orders results after ``duplex cancel``.
SQLite needs no row locks: ``BEGIN IMMEDIATE`` already serialises writers.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, exists, insert, not_, select, update

from app.errors import StorageError
from app.messages import (
    DomainEvent,
    EventDeclaration,
    JSONDict,
    StepOutcome,
)
from app.models import (
    domain_events,
    tasks,
    unindexed,
    workflow_step_edges,
    workflow_step_transitions,
    workflow_steps,
)
from app.retry import RetryPolicy
from app.states import (
    CANCELLED,
    COMPLETE,
    DONE,
    ENQUEUED,
    IN_PROGRESS,
    PENDING,
    STEP_STATES,
    TASK_CANCELLED,
    TASK_FINISHED,
    WAITING_FOR_RETRY,
    derive_task_state,
)

ws = workflow_steps


@dataclass
class CommitReport:
    """What a batch commit did."""

    applied: list[StepOutcome] = field(default_factory=list)
    rejected: list[StepOutcome] = field(default_factory=list)
    events: list[DomainEvent] = field(default_factory=list)
    enqueued: int = 0
    next_retry_at: datetime | None = None


def commit_outcomes(
    conn: Connection,
    outcomes: Sequence[StepOutcome],
    *,
    policy: RetryPolicy,
    now: datetime,
    rng: random.Random,
) -> CommitReport:
    """Apply ``outcomes`` inside the caller's write transaction and return what happened.

    A result for a step whose task was cancelled while it ran is still recorded, but it does
    not resume the workflow: no dependent is enqueued, and a failure that would be retried
    moves the step to ``cancelled`` instead.
    """
    report = CommitReport()
    if not outcomes:
        return report
    transitions: list[dict[str, Any]] = []
    event_rows: list[dict[str, Any]] = []
    completed: list[str] = []
    touched_tasks: set[str] = set()
    task_states = lock_tasks(conn, {outcome.step.task_uuid for outcome in outcomes})
    held = _claims_held(conn, [outcome.step.step_uuid for outcome in outcomes])
    updates: list[dict[str, Any]] = []

    for outcome in outcomes:
        step = outcome.step
        # The guard: the claim must still be this attempt's, by this claimant. A late result
        # (after a timeout or a recovery) or a duplicate is rejected, never applied twice.
        if held.pop(step.step_uuid, None) != (step.attempt, step.claimed_by):
            report.rejected.append(outcome)
            continue
        task_cancelled = task_states.get(step.task_uuid) == TASK_CANCELLED
        reason = _reason(outcome)
        if outcome.failure is None:
            new_state, next_at = COMPLETE, None
        else:
            decision = policy.decide(
                outcome.failure,
                attempt=step.attempt,
                max_attempts=step.max_attempts,
                step_retryable=step.retryable,
                now=now,
                rng=rng,
            )
            new_state, next_at = decision.state, decision.next_attempt_at
            if task_cancelled and new_state == WAITING_FOR_RETRY:
                new_state, next_at = CANCELLED, None
                reason += "; retry cancelled (task cancelled)"
        updates.append(
            {
                "b_step_uuid": step.step_uuid,
                "b_attempt": step.attempt,
                "b_claimed_by": step.claimed_by,
                "v_state": new_state,
                "v_results": outcome.result,
                "v_error": None if outcome.failure is None else outcome.failure.as_json(),
                "v_next_attempt_at": next_at,
                "v_started_at": outcome.started_at,
                "v_completed_at": None if next_at is not None else now,
                "v_updated_at": now,
            }
        )
        report.applied.append(outcome)
        touched_tasks.add(step.task_uuid)
        if new_state == COMPLETE and not task_cancelled:
            completed.append(step.step_uuid)
        if next_at is not None and (report.next_retry_at is None or next_at < report.next_retry_at):
            report.next_retry_at = next_at
        transitions.append(
            transition_row(
                step.step_uuid, IN_PROGRESS, new_state, step.attempt, step.claimed_by, now, reason
            )
        )
        for name, payload in _events_of(outcome, new_state, next_at):
            event = DomainEvent(
                str(uuid.uuid4()), name, step.task_uuid, step.step_uuid, payload, now
            )
            report.events.append(event)
            event_rows.append(
                {
                    "event_id": event.event_id,
                    "name": event.name,
                    "task_uuid": event.task_uuid,
                    "step_uuid": event.step_uuid,
                    "payload": event.payload,
                    "created_at": now,
                }
            )

    if updates:
        result = conn.execute(_APPLY_OUTCOME, updates)
        if conn.dialect.supports_sane_multi_rowcount and result.rowcount != len(updates):
            # The rows were checked under lock above; a mismatch means another writer broke
            # the locking order. Roll the whole batch back; it is retried and re-checked.
            raise StorageError(
                f"applied {result.rowcount} of {len(updates)} checked results; batch rolled back"
            )
    if completed:
        for step_uuid in enqueue_ready_dependents(conn, completed, now=now):
            transitions.append(
                transition_row(step_uuid, PENDING, ENQUEUED, 0, None, now, "dependencies complete")
            )
            report.enqueued += 1
    if transitions:
        conn.execute(insert(workflow_step_transitions), transitions)
    if event_rows:
        conn.execute(insert(domain_events), event_rows)
    if touched_tasks:
        update_task_states(conn, touched_tasks, now=now, locked_states=task_states)
    return report


# One statement for every applied outcome of a batch (executemany). The guard is repeated in
# SQL; ``state || ''`` keeps SQLite on the primary key instead of scanning the state index.
_APPLY_OUTCOME = (
    update(ws)
    .where(
        ws.c.step_uuid == bindparam("b_step_uuid"),
        unindexed(ws.c.state) == IN_PROGRESS,
        ws.c.attempts == bindparam("b_attempt"),
        ws.c.claimed_by == bindparam("b_claimed_by"),
    )
    .values(
        state=bindparam("v_state"),
        results=bindparam("v_results", type_=ws.c.results.type),
        error=bindparam("v_error", type_=ws.c.error.type),
        next_attempt_at=bindparam("v_next_attempt_at", type_=ws.c.next_attempt_at.type),
        started_at=bindparam("v_started_at", type_=ws.c.started_at.type),
        completed_at=bindparam("v_completed_at", type_=ws.c.completed_at.type),
        updated_at=bindparam("v_updated_at", type_=ws.c.updated_at.type),
    )
)


def _claims_held(conn: Connection, step_uuids: Sequence[str]) -> dict[str, tuple[int, str | None]]:
    """Return (attempt, claimant) of each given step that is still ``in_progress``."""
    query = _CLAIMS_HELD_FOR_UPDATE if conn.dialect.name == "postgresql" else _CLAIMS_HELD
    rows = conn.execute(query, {"ids": sorted(set(step_uuids))})
    return {row.step_uuid: (row.attempts, row.claimed_by) for row in rows}


_CLAIMS_HELD = select(ws.c.step_uuid, ws.c.attempts, ws.c.claimed_by).where(
    ws.c.step_uuid.in_(bindparam("ids", expanding=True)), unindexed(ws.c.state) == IN_PROGRESS
)
_CLAIMS_HELD_FOR_UPDATE = _CLAIMS_HELD.with_for_update()


_other_edge = workflow_step_edges.alias("other_edge")
_other_parent = ws.alias("other_parent")
_ENQUEUE_READY = (
    update(ws)
    .where(
        unindexed(ws.c.state) == PENDING,
        ws.c.step_uuid.in_(
            select(workflow_step_edges.c.to_step_uuid).where(
                workflow_step_edges.c.from_step_uuid.in_(bindparam("parents", expanding=True))
            )
        ),
        # ...and no parent that is not yet complete or resolved.
        not_(
            exists().where(
                _other_edge.c.to_step_uuid == ws.c.step_uuid,
                _other_parent.c.step_uuid == _other_edge.c.from_step_uuid,
                not_(_other_parent.c.state.in_(DONE)),
            )
        ),
    )
    .values(
        state=ENQUEUED,
        next_attempt_at=bindparam("now", type_=ws.c.next_attempt_at.type),
        updated_at=bindparam("now", type_=ws.c.updated_at.type),
    )
    .returning(ws.c.step_uuid)
)


def enqueue_ready_dependents(
    conn: Connection, parents: Iterable[str], *, now: datetime
) -> list[str]:
    """Enqueue pending children of ``parents`` whose parents are now all complete or resolved."""
    rows = conn.execute(_ENQUEUE_READY, {"parents": list(parents), "now": now})
    return sorted(row.step_uuid for row in rows)


def lock_tasks(conn: Connection, task_uuids: Iterable[str]) -> dict[str, str]:
    """Lock the task rows (PostgreSQL ``FOR UPDATE``, in uuid order) and return their states.

    Call it before touching the tasks' steps, so every writer takes locks in one order.
    """
    ids = sorted(set(task_uuids))
    if not ids:
        return {}
    query = _LOCK_TASKS if conn.dialect.name == "postgresql" else _TASK_STATES
    return {task_uuid: state for task_uuid, state in conn.execute(query, {"ids": ids})}


_TASK_STATES = select(tasks.c.task_uuid, tasks.c.state).where(
    tasks.c.task_uuid.in_(bindparam("ids", expanding=True))
)
# PostgreSQL locks rows as the sorted result is produced: a deadlock-free order.
_LOCK_TASKS = _TASK_STATES.order_by(tasks.c.task_uuid).with_for_update()


def update_task_states(
    conn: Connection,
    task_uuids: Iterable[str],
    *,
    now: datetime,
    locked_states: Mapping[str, str] | None = None,
) -> None:
    """Bring each task's state in line with its steps (see ``derive_task_state``).

    ``locked_states`` are the states ``lock_tasks`` read in this transaction, if at hand.
    """
    ids = sorted(set(task_uuids))
    if locked_states is None:
        locked_states = {t: s for t, s in conn.execute(_TASK_STATES, {"ids": ids})}
    current = {
        task_uuid: locked_states[task_uuid] for task_uuid in ids if task_uuid in locked_states
    }
    for task_uuid, state in current.items():
        new_state = derive_task_state(state, _states_present(conn, task_uuid))
        if new_state == state:
            continue
        values: dict[str, Any] = {"state": new_state, "updated_at": now}
        values["completed_at"] = now if new_state in TASK_FINISHED else None
        conn.execute(update(tasks).where(tasks.c.task_uuid == task_uuid).values(**values))


def _states_present(conn: Connection, task_uuid: str) -> dict[str, int]:
    """Return {state: 1} for each state some step of the task is in.

    One probe per state on the (task_uuid, state) index, so the cost does not grow with the
    size of the task (counting every step of a 5000-step task on each commit did).
    """
    row = conn.execute(_STATES_PRESENT, {"task_uuid": task_uuid}).one()
    return {state: 1 for state in STEP_STATES if row._mapping[state]}


_STATES_PRESENT = select(
    *[
        exists().where(ws.c.task_uuid == bindparam("task_uuid"), ws.c.state == state).label(state)
        for state in STEP_STATES
    ]
)


def declared_events(raw: Any) -> tuple[EventDeclaration, ...]:
    """Turn a step's stored ``declared_events`` JSON into declarations."""
    return tuple(EventDeclaration(e["name"], e.get("condition", "success")) for e in raw or ())


def transition_row(
    step_uuid: str,
    from_state: str | None,
    to_state: str,
    attempt: int,
    worker_id: str | None,
    now: datetime,
    reason: str | None,
) -> dict[str, Any]:
    """Build one ``workflow_step_transitions`` row."""
    return {
        "step_uuid": step_uuid,
        "from_state": from_state,
        "to_state": to_state,
        "attempt": attempt,
        "worker_id": worker_id,
        "reason": reason,
        "created_at": now,
    }


def _reason(outcome: StepOutcome) -> str:
    return "succeeded" if outcome.failure is None else outcome.failure.error_type


def _events_of(
    outcome: StepOutcome, new_state: str, next_at: datetime | None
) -> list[tuple[str, JSONDict]]:
    """List the domain events an applied outcome produces, in order.

    Events the handler emitted come first, then ``step.completed`` or ``step.failed``, then
    the template's declared events whose condition matches how the step ended.
    """
    step = outcome.step
    base: JSONDict = {"step_name": step.name, "handler": step.handler, "attempt": step.attempt}
    events: list[tuple[str, JSONDict]] = [(e.name, e.payload) for e in outcome.events]
    if outcome.failure is None:
        events.append(("step.completed", base))
        declared_payload: JSONDict = {**base, "outcome": "success", "result": outcome.result}
        wanted: tuple[str, ...] = ("success", "always")
    else:
        failure = outcome.failure
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
        declared_payload = {
            **base,
            "outcome": "failure",
            "error_type": failure.error_type,
            "message": failure.message,
            "state": new_state,
        }
        # Declared failure events are about the step, not an attempt: a failure that will be
        # retried is not one (``step.failed`` above reports every failed attempt).
        wanted = () if new_state == WAITING_FOR_RETRY else ("failure", "always")
    events.extend((d.name, declared_payload) for d in step.declared_events if d.condition in wanted)
    return events
