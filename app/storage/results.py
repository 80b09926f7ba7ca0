"""Committing attempt outcomes: the orchestration step of Duplex, in one transaction per batch.

For each outcome the step row is updated under a guard (still ``in_progress``, same attempt,
same claimant), so a late or duplicate result is rejected, never applied twice. In the same
transaction: the transition row, the domain events (outbox rows), dependents made ready and
task states brought up to date. Events are returned to be published only after the commit.

Every writer that changes what may run next in a task (this module, releases of claims, the
operator commands) first locks the task rows, in task-uuid order (``lock_tasks``, or for a commit
batch the statement that also reads its claims). On
PostgreSQL under READ COMMITTED this is what makes readiness correct: without it, two workers
committing the last two parents of a step at once could each still see the other parent
running, and the child would never be enqueued. It also orders results after ``duplex cancel``.
SQLite needs no row locks: ``BEGIN IMMEDIATE`` already serialises writers.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    CompoundSelect,
    Connection,
    bindparam,
    cast,
    null,
    select,
    union_all,
    update,
)

from duplex.commit.retry import RetryPolicy
from duplex.errors import StorageError
from duplex.messages import (
    ClaimedStep,
    DomainEvent,
    StepOutcome,
)
from duplex.states import (
    CANCELLED,
    COMPLETE,
    IN_PROGRESS,
    TASK_CANCELLED,
    TASK_IN_PROGRESS,
    WAITING_FOR_RETRY,
)
from duplex.storage.concurrency import let_go
from duplex.storage.deadlines import ExpiredTask
from duplex.storage.direct import DirectStatement
from duplex.storage.driver import BulkStatement, db_json, db_time
from duplex.storage.events import EventLog, events_of, wait_events
from duplex.storage.expansion import BatchMade, Decided, advance
from duplex.storage.models import (
    tasks,
    unindexed,
    workflow_steps,
)
from duplex.storage.readiness import ReadyStep
from duplex.storage.task_state import update_task_states
from duplex.storage.transitions import TransitionRow, insert_transitions, transition_row

ws = workflow_steps


@dataclass
class CommitReport:
    """What a batch commit did."""

    applied: list[StepOutcome] = field(default_factory=list)
    rejected: list[StepOutcome] = field(default_factory=list)
    # Applied failures whose step waits for another attempt (for the retry metric).
    retrying: list[StepOutcome] = field(default_factory=list)
    events: list[DomainEvent] = field(default_factory=list)
    enqueued: int = 0
    # The dependents made ready (``enqueued`` of them), and how many applied results completed
    # a step that has dependents: at most that many are claimed in the same transaction.
    ready: list[ReadyStep] = field(default_factory=list)
    parents_completed: int = 0
    # The dependents the committing worker claimed in the same transaction, to run at once
    # (``duplex.commit.committer``); claimed exactly as ``claim_ready_steps`` claims.
    claimed: list[ClaimedStep] = field(default_factory=list)
    next_retry_at: datetime | None = None
    # Tasks this transaction cancelled at their deadline (``duplex.storage.deadlines``).
    expired: list[ExpiredTask] = field(default_factory=list)


def commit_outcomes(
    conn: Connection,
    outcomes: Sequence[StepOutcome],
    *,
    policy: RetryPolicy,
    now: datetime,
    rng: random.Random,
    transitions: list[TransitionRow] | None = None,
) -> CommitReport:
    """Apply ``outcomes`` inside the caller's write transaction and return what happened.

    Given ``transitions``, the transition rows go there for the caller to insert with the rest
    of its transaction's (the claims of its dependents: one statement), instead of here.

    A result for a step whose task was cancelled while it ran is still recorded, but it does
    not resume the workflow: no dependent is enqueued, and a failure that would be retried
    moves the step to ``cancelled`` instead.
    """
    report = CommitReport()
    if not outcomes:
        return report
    dialect = conn.dialect
    at = db_time(dialect, now)
    written_here = transitions is None
    transitions = [] if transitions is None else transitions
    completed: list[str] = []
    decisions: list[Decided] = []
    batches: list[BatchMade] = []
    touched_tasks: set[str] = set()
    task_states, held = _lock_tasks_and_read_claims(conn, outcomes)
    log = EventLog(conn, task_states, now=now, at=at)
    updates: list[tuple[Any, ...]] = []

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
        failure = outcome.failure
        if failure is None:
            new_state, next_at = COMPLETE, None
        else:
            # The step's own ``[steps.retry]``, if its template set one (duplex.commit.retry).
            decision = policy.for_step(step.retry_policy).decide(
                failure,
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
            (
                new_state,
                outcome.result_json or db_json(outcome.result),
                db_json(None if failure is None else failure.as_json()),
                db_time(dialect, next_at),
                db_time(dialect, outcome.started_at),
                None if next_at is not None else at,
                at,
                step.step_uuid,
                step.attempt,
                step.claimed_by,
            )
        )
        report.applied.append(outcome)
        if new_state == WAITING_FOR_RETRY:
            report.retrying.append(outcome)
        touched_tasks.add(step.task_uuid)
        if new_state == COMPLETE and not task_cancelled:
            # A decision's or batch's result shapes the task (duplex.storage.expansion).
            if outcome.branches is not None:
                decisions.append(
                    Decided(step.step_uuid, step.task_uuid, step.name, outcome.branches)
                )
            if outcome.items is not None:
                batches.append(BatchMade(step.step_uuid, step.task_uuid, step.name, outcome.items))
            if step.has_children:
                completed.append(step.step_uuid)
        if next_at is not None and (report.next_retry_at is None or next_at < report.next_retry_at):
            report.next_retry_at = next_at
        transitions.append(
            transition_row(
                step.step_uuid, IN_PROGRESS, new_state, step.attempt, step.claimed_by, at, reason
            )
        )
        for name, payload in events_of(outcome, new_state, next_at):
            log.add(name, step.task_uuid, step.step_uuid, payload)

    if updates:
        rowcount = _APPLY_OUTCOME.execute(conn, updates)
        if dialect.supports_sane_multi_rowcount and rowcount != len(updates):
            # The rows were checked under lock above; a mismatch means another writer broke
            # the locking order. Roll the whole batch back; it is retried and re-checked.
            raise StorageError(
                f"applied {rowcount} of {len(updates)} checked results; batch rolled back"
            )
    if completed or decisions or batches:
        report.parents_completed = len(completed)
        progress = advance(
            conn,
            completed=completed,
            decisions=decisions,
            batches=batches,
            now=now,
            worker_id=None,
        )
        report.ready = progress.ready
        transitions.extend(progress.transitions)
        report.enqueued = len(report.ready)
        for wait in progress.signalled:
            for name, payload in wait_events(wait.name, wait.result, wait.declared_events):
                log.add(name, wait.task_uuid, wait.step_uuid, payload)
    # Each keyed attempt that ended frees a slot of its key: a step it held back may go.
    freed = Counter(o.step.concurrency_key for o in report.applied if o.step.concurrency_key)
    if freed:
        report.ready.extend(let_go(conn, freed, now=now, worker_id=None))
        report.enqueued = len(report.ready)
    if written_here:
        insert_transitions(conn, transitions)
    report.events = log.write()
    # A running task with a step waiting for a retry or made ready in this transaction is
    # still running (``derive_task_state``): probing its steps' states would only say so.
    going_on = {o.step.task_uuid for o in report.retrying} | {s.task_uuid for s in report.ready}
    unsettled = {
        task_uuid
        for task_uuid in touched_tasks
        if task_uuid not in going_on or task_states.get(task_uuid) != TASK_IN_PROGRESS
    }
    if unsettled:
        update_task_states(conn, unsettled, now=now, locked_states=task_states)
    return report


# One statement for every applied outcome of a batch (executemany). The guard is repeated in
# SQL; ``state || ''`` keeps SQLite on the primary key instead of scanning the state index.
_APPLY_OUTCOME = BulkStatement(
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
    ),
    (
        "v_state",
        "v_results",
        "v_error",
        "v_next_attempt_at",
        "v_started_at",
        "v_completed_at",
        "v_updated_at",
        "b_step_uuid",
        "b_attempt",
        "b_claimed_by",
    ),
)


def _lock_tasks_and_read_claims(
    conn: Connection, outcomes: Sequence[StepOutcome]
) -> tuple[dict[str, str], dict[str, tuple[int, str | None]]]:
    """Lock the batch's task rows as ``lock_tasks`` does and return their states, with the
    (attempt, claimant) of each of the batch's steps still ``in_progress``, in one statement.
    """
    query = _LOCK_TASKS_WITH_CLAIMS if conn.dialect.name == "postgresql" else _TASKS_WITH_CLAIMS
    params = {
        "task_ids": sorted({outcome.step.task_uuid for outcome in outcomes}),
        "step_ids": sorted({outcome.step.step_uuid for outcome in outcomes}),
    }
    task_states: dict[str, str] = {}
    held: dict[str, tuple[int, str | None]] = {}
    for task_uuid, task_state, step_uuid, attempts, claimed_by in query.rows(conn, params):
        if step_uuid is None:
            task_states[task_uuid] = task_state
        else:
            held[step_uuid] = (attempts, claimed_by)
    return task_states, held


def _tasks_with_claims(*, lock: bool) -> CompoundSelect[Any]:
    # The task rows first, then the claims: both databases run UNION ALL in order, so on
    # PostgreSQL the task rows are locked (in uuid order, as they are produced: the
    # deadlock-free order of ``lock_tasks``) before the claims are read.
    task_rows = (
        select(
            tasks.c.task_uuid,
            tasks.c.state.label("task_state"),
            cast(null(), ws.c.step_uuid.type).label("step_uuid"),
            cast(null(), ws.c.attempts.type).label("attempts"),
            cast(null(), ws.c.claimed_by.type).label("claimed_by"),
        )
        .where(tasks.c.task_uuid.in_(bindparam("task_ids", expanding=True)))
        .order_by(tasks.c.task_uuid)
    )
    claims = select(null(), null(), ws.c.step_uuid, ws.c.attempts, ws.c.claimed_by).where(
        ws.c.step_uuid.in_(bindparam("step_ids", expanding=True)),
        unindexed(ws.c.state) == IN_PROGRESS,
    )
    if not lock:
        return union_all(select(task_rows.subquery("task_rows")), claims)
    # The claims are locked too, though no one else can move them once the tasks are ours:
    # a statement reads with the snapshot it started with, and a claim moved by the writer
    # whose task lock this one waited for would still look held. A locked row is read as
    # committed, and its guard checked again.
    return union_all(
        select(task_rows.with_for_update().subquery("locked_tasks")),
        select(claims.with_for_update().subquery("locked_claims")),
    )


_TASKS_WITH_CLAIMS = DirectStatement(_tasks_with_claims(lock=False))
_LOCK_TASKS_WITH_CLAIMS = DirectStatement(_tasks_with_claims(lock=True))


def _reason(outcome: StepOutcome) -> str:
    return "succeeded" if outcome.failure is None else outcome.failure.error_type
