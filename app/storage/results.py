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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from app.errors import StorageError
from app.messages import (
    DomainEvent,
    StepOutcome,
)
from app.models import (
    domain_events,
    unindexed,
    workflow_step_transitions,
    workflow_steps,
)
from app.retry import RetryPolicy
from app.states import (
    CANCELLED,
    COMPLETE,
    ENQUEUED,
    IN_PROGRESS,
    PENDING,
    TASK_CANCELLED,
    WAITING_FOR_RETRY,
)
from app.storage.events import events_of
from app.storage.outbox import next_sequences, notify_new_events
from app.storage.readiness import enqueue_ready_dependents
from app.storage.task_state import lock_tasks, update_task_states
from app.storage.transitions import transition_row

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
    sequences: dict[str, int] | None = None

    for outcome in outcomes:
        step = outcome.step
        # The guard: the claim must still be this attempt's, by this claimant. A late result
        # (after a timeout or a recovery) or a duplicate is rejected, never applied twice.
        if held.get(step.step_uuid) != (step.attempt, step.claimed_by):
            report.rejected.append(outcome)
            continue
        # Taken only on a match: a late result of an earlier attempt in the same batch must
        # not use up the claim of the current one; a duplicate finds it gone.
        del held[step.step_uuid]
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
        for name, payload in events_of(outcome, new_state, next_at):
            if sequences is None:
                # Under the task locks taken above: numbers follow commit order (outbox.py).
                sequences = next_sequences(conn, task_states)
            sequences[step.task_uuid] = sequence = sequences.get(step.task_uuid, 0) + 1
            event = DomainEvent(
                str(uuid.uuid4()), name, step.task_uuid, step.step_uuid, payload, now, sequence
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
                    "sequence": sequence,
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
        notify_new_events(conn, report.events)
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


def _reason(outcome: StepOutcome) -> str:
    return "succeeded" if outcome.failure is None else outcome.failure.error_type
