"""Claiming ready steps (handing back claims that never started: ``duplex.storage.releases``).

A claim is atomic: the candidate rows are read and updated in one write transaction
(``BEGIN IMMEDIATE`` on SQLite, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL), and the update is
guarded by state, so two workers can never claim the same attempt.

Which steps first: the claim order of ``claim_key`` (priority, aged by waiting; see
docs/time.md). A step is never claimed before its ``next_attempt_at`` (the not-before time of
a delayed start, the due time of a retry).

Steps are claimed in two ways, through one core (``claim_steps``): from the queue
(``claim_ready_steps``), and, inside a result's commit, dependents that commit just made ready
(``claim_dependents``: no other transaction has seen them enqueued, so there is nothing to
skip). Both record the same claim: transition row, attempt, claimant, ``claimed_at``.

A claim never waits for a task row: the other writers lock the task before its steps (see
``duplex.storage.results``), so a claim that held step locks while waiting for a task could deadlock
with ``duplex cancel``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Boolean,
    Connection,
    bindparam,
    literal_column,
    update,
)

from duplex.messages import ClaimedStep, RetryOverride
from duplex.states import (
    CLAIMABLE,
    ENQUEUED,
    IN_PROGRESS,
    TASK_PENDING,
)
from duplex.storage.claim_order import DEFAULT_AGING, claim_key, due_levels, due_steps
from duplex.storage.concurrency import Admission, ClaimHints, admit
from duplex.storage.direct import DirectStatement
from duplex.storage.driver import db_time
from duplex.storage.events import declared_events
from duplex.storage.models import (
    tasks,
    unindexed,
    workflow_steps,
)
from duplex.storage.pauses import NOT_PAUSED
from duplex.storage.readiness import RETURN_PARENTS, ReadyStep, parents_of
from duplex.storage.task_state import mark_tasks_started
from duplex.storage.transitions import (
    TransitionRow,
    insert_pending,
    insert_transitions,
    transition_row,
)

ws = workflow_steps


def claim_ready_steps(
    conn: Connection,
    *,
    worker_id: str,
    namespaces: Sequence[str],
    limit: int,
    now: datetime,
    aging: timedelta = DEFAULT_AGING,
    hints: ClaimHints | None = None,
) -> list[ClaimedStep]:
    """Claim up to ``limit`` due steps of ``namespaces``, in claim order (``claim_key``);
    ``hints`` learns when rate limit tokens that candidates wait for come.

    Steps not yet due (a delayed start, a retry's backoff) cost the claim nothing, however
    many there are (``duplex.storage.claim_order``).
    """
    if limit <= 0 or not namespaces:
        return []
    # Candidates held back by their concurrency key leave the queue's head; look again, with
    # a wider window, so that a key with a long backlog does not starve the claim. Each round
    # claims what it admitted (the next round counts those as running); only the first waits
    # for keys' locks: once this transaction holds some, waiting could close a cycle.
    claimed: list[ClaimedStep] = []
    window = limit
    for round in range(_HOLDING_ROUNDS):
        due = due_steps(conn, namespaces, limit=window, now=now, aging=aging)
        candidates, room = due.states, limit - len(claimed)
        # The usual claim has no key nor limit to count: no flow control read.
        admission = (
            admit(conn, candidates, room=room, now=now, worker_id=worker_id, wait=round == 0)
            if due.limited
            else Admission.first(candidates, room)
        )
        claimed += claim_steps(conn, admission.admitted, worker_id=worker_id, now=now)
        if hints is not None:
            hints.add(admission)
        if not admission.held or len(claimed) >= limit or len(candidates) < window:
            break
        window = min(window * 4, _MAX_WINDOW)
    return claimed


# How many times a claim looks again past held candidates, and how far at most.
_HOLDING_ROUNDS = 4
_MAX_WINDOW = 1000


def claim_dependents(
    conn: Connection,
    ready: Sequence[ReadyStep],
    *,
    worker_id: str,
    namespaces: Sequence[str],
    limit: int,
    now: datetime,
    aging: timedelta = DEFAULT_AGING,
    hints: ClaimHints | None = None,
    transitions: list[TransitionRow] | None = None,
) -> list[ClaimedStep]:
    """Claim up to ``limit`` of the dependents ``ready`` that the commit in this transaction
    just enqueued, those of ``namespaces`` only; the others stay in the queue (``hints``, as
    for ``claim_ready_steps``).

    The claim order holds here too (docs/time.md, Priority). A dependent is claimed only if
    no due work of a higher priority waits (the dependents themselves count, being
    enqueued), and no due work of a lower priority has aged past it (its claim key is
    earlier than the dependent's): otherwise a stream of high-priority chains, each claiming
    its next step at its commit, would hold low-priority work back beyond the aging bound.
    Equal priorities do not hold a dependent back, so a chain goes on depth-first.
    """
    mine = [step for step in ready if step.namespace in namespaces]
    if not mine or limit <= 0:
        return []
    # The oldest due step of every level (``nth`` = 1), dependents included.
    levels = due_levels(conn, namespaces, now=now)

    def outranked(priority: int) -> bool:
        key = claim_key(now, priority, aging)
        return any(
            level.priority > priority
            or (
                level.priority < priority
                and level.nth is not None
                and claim_key(level.nth, level.priority, aging) < key
            )
            for level in levels
        )

    chosen = sorted((s for s in mine if not outranked(s.priority)), key=lambda s: -s.priority)
    candidates = dict.fromkeys([step.step_uuid for step in chosen], ENQUEUED)
    admitted = Admission.first(candidates, limit).admitted
    if any(step.limited for step in chosen):  # the usual hop has no key nor limit to read
        if transitions:  # a hold writes its own rows: the commit's go first
            insert_pending(conn, transitions)
        # Never waits for a key's lock: this transaction holds task locks already.
        admission = admit(conn, candidates, room=limit, now=now, worker_id=worker_id, wait=False)
        if hints is not None:
            hints.add(admission)
        admitted = admission.admitted
    return claim_steps(conn, admitted, worker_id=worker_id, now=now, transitions=transitions)


def claim_steps(
    conn: Connection,
    candidates: Mapping[str, str],
    *,
    worker_id: str,
    now: datetime,
    transitions: list[TransitionRow] | None = None,
) -> list[ClaimedStep]:
    """Claim ``candidates`` (step uuid -> the claimable state it was read in), in that order.

    The update is guarded by state, so a candidate no longer claimable is skipped. Each claim
    writes its transition row (from the state read, reason ``claimed``), counts the attempt,
    stamps ``claimed_by`` and ``claimed_at`` with ``now``, and brings its parents' results.
    Given ``transitions``, the transition rows go there for the caller to insert with the rest
    of its transaction's (one statement), instead of being inserted here.
    """
    if not candidates:
        return []
    claimed = _CLAIM[conn.dialect.name].rows(
        conn, {"ids": list(candidates), "worker_id": worker_id, "now": now}
    )
    if not claimed:
        return []
    # RETURNING gives no order guarantee; keep the candidates' order (the claim order).
    order = {step_uuid: i for i, step_uuid in enumerate(candidates)}
    claimed.sort(key=lambda r: order[r.step_uuid])

    at = db_time(conn.dialect, now)
    rows = [
        transition_row(
            row.step_uuid,
            candidates[row.step_uuid],
            IN_PROGRESS,
            row.attempts,
            worker_id,
            at,
            "claimed",
        )
        for row in claimed
    ]
    if transitions is None:
        insert_transitions(conn, rows)
    else:
        transitions.extend(rows)
    # The claim's RETURNING already brought each task's state and context and the step's
    # parents' results: only what is needed is written on top.
    pending = sorted({row.task_uuid for row in claimed if row.task_state == TASK_PENDING})
    if pending:
        mark_tasks_started(conn, pending, now)
    steps = []
    for row in claimed:
        parents, skipped = parents_of(conn.dialect.name, row.parents)
        steps.append(
            claimed_step(
                row,
                claimed_by=worker_id,
                inputs=row.inputs or {},
                task_context=row.task_context or {},
                dependency_results=parents,
                has_children=row.has_children,
                claimed_at=now,
                deadline_at=row.task_deadline_at,
                checkpoint_state=row.checkpoint,
                skipped_dependencies=tuple(skipped),
            )
        )
    return steps


# The columns a ``ClaimedStep`` is built from (see ``claimed_step``).
STEP_COLUMNS = (
    ws.c.step_uuid,
    ws.c.task_uuid,
    ws.c.name,
    ws.c.handler,
    ws.c.attempts,
    ws.c.max_attempts,
    ws.c.retryable,
    ws.c.timeout_ms,
    ws.c.declared_events,
    ws.c.namespace,
    ws.c.created_at,
    ws.c.retry_policy,
    ws.c.kind,
    ws.c.spec,
    ws.c.concurrency_key,
)


def claimed_step(row: Any, *, claimed_by: str, **context: Any) -> ClaimedStep:
    """Build the ``ClaimedStep`` of a row read with ``STEP_COLUMNS``.

    ``context`` (inputs, task context, dependency results) is only needed to run the step.
    """
    return ClaimedStep(
        step_uuid=row.step_uuid,
        task_uuid=row.task_uuid,
        name=row.name,
        handler=row.handler,
        attempt=row.attempts,
        max_attempts=row.max_attempts,
        retryable=row.retryable,
        timeout_ms=row.timeout_ms,
        claimed_by=claimed_by,
        declared_events=declared_events(row.declared_events),
        namespace=row.namespace,
        submitted_at=row.created_at,
        retry_policy=RetryOverride.from_json(row.retry_policy),
        kind=row.kind,
        spec=row.spec,
        concurrency_key=row.concurrency_key,
        **context,
    )


_NOW = bindparam("now", type_=ws.c.updated_at.type)
# Read in the claim's own RETURNING, saving a statement each. Spelled out in SQL because
# SQLAlchemy renders columns in RETURNING without their table, which would turn the
# correlation ``t.task_uuid = workflow_steps.task_uuid`` into ``task_uuid = task_uuid``.
_RETURN_TASK_STATE = literal_column(
    "(SELECT t.state FROM tasks AS t WHERE t.task_uuid = workflow_steps.task_uuid)",
    tasks.c.state.type,
).label("task_state")
_RETURN_TASK_CONTEXT = literal_column(
    "(SELECT t.context FROM tasks AS t WHERE t.task_uuid = workflow_steps.task_uuid)",
    tasks.c.context.type,
).label("task_context")
# The task's deadline (``max_duration``): the Dispatcher cancels the attempt then.
_RETURN_TASK_DEADLINE = literal_column(
    "(SELECT t.deadline_at FROM tasks AS t WHERE t.task_uuid = workflow_steps.task_uuid)",
    tasks.c.deadline_at.type,
).label("task_deadline_at")
_RETURN_HAS_CHILDREN = literal_column(
    "EXISTS (SELECT 1 FROM workflow_step_edges AS e"
    " WHERE e.from_step_uuid = workflow_steps.step_uuid)",
    Boolean(),
).label("has_children")


def _claim_statement(dialect: str) -> Any:
    return (
        update(ws)
        .where(
            ws.c.step_uuid.in_(bindparam("ids", expanding=True)),
            unindexed(ws.c.state).in_(CLAIMABLE),
            # Never before its time (a delayed start, a retry's backoff), whoever claims it.
            ws.c.next_attempt_at <= _NOW,
            # Here too, so that eager claims and a claim racing ``duplex pause`` obey it.
            NOT_PAUSED,
        )
        .values(
            state=IN_PROGRESS,
            attempts=ws.c.attempts + 1,
            claimed_by=bindparam("worker_id"),
            claimed_at=_NOW,
            started_at=None,
            next_attempt_at=None,
            updated_at=_NOW,
        )
        .returning(
            *STEP_COLUMNS,
            ws.c.inputs,
            ws.c.checkpoint,
            _RETURN_TASK_STATE,
            _RETURN_TASK_CONTEXT,
            _RETURN_TASK_DEADLINE,
            RETURN_PARENTS[dialect],
            _RETURN_HAS_CHILDREN,
        )
    )


# Per dialect: the parents' read is spelled in each one's JSON functions.
_CLAIM = {dialect: DirectStatement(_claim_statement(dialect)) for dialect in RETURN_PARENTS}
