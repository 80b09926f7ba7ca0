"""Writing tasks from validated templates: tasks, steps, edges and their first transitions.

Many tasks go in one transaction with one batched insert per table, however many tasks
there are. An idempotency key is unique per template name: a key already used returns
the existing task and writes nothing for it.

A delayed start (``run_at``) is the roots' ``next_attempt_at``: the claim takes a step only
once that time has come (``duplex.storage.claims``), so a delayed task needs no state or
process of its own. ``priority`` replaces the template's top-level one for this submission.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection, bindparam, select

from duplex.dynamic.kinds import item_steps, submitted_parents
from duplex.dynamic.specs import first_wait_until, step_spec
from duplex.errors import InputError
from duplex.flow.concurrency import KeyNotFound, concurrency_key
from duplex.messages import JSONDict
from duplex.states import ENQUEUED, PENDING, TASK_PENDING, WAITING
from duplex.storage.driver import ColumnInsert
from duplex.storage.models import (
    tasks,
    workflow_step_edges,
    workflow_step_transitions,
    workflow_steps,
)
from duplex.storage.rate_limits import check_limits_exist, rate_columns
from duplex.templates import StepTemplate, TaskTemplate

# SQLite allows 32766 bound parameters per statement; stay well below it.
_MAX_PARAMETERS = 30_000


def create_task(
    conn: Connection,
    template: TaskTemplate,
    context: JSONDict,
    *,
    now: datetime,
    task_uuid: str | None = None,
    idempotency_key: str | None = None,
    trace_context: dict[str, str] | None = None,
    run_at: datetime | None = None,
    priority: int | None = None,
    max_duration: timedelta | None = None,
) -> str:
    """Write one task; roots start ``enqueued``, the rest ``pending``. Return its UUID."""
    (task_id,) = create_tasks(
        conn,
        template,
        [context],
        now=now,
        idempotency_keys=[idempotency_key],
        task_uuids=[task_uuid or str(uuid.uuid4())],
        trace_context=trace_context,
        run_at=run_at,
        priority=priority,
        max_duration=max_duration,
    )
    return task_id


def create_tasks(
    conn: Connection,
    template: TaskTemplate,
    contexts: Sequence[JSONDict],
    *,
    now: datetime,
    idempotency_keys: Sequence[str | None] | None = None,
    task_uuids: Sequence[str] | None = None,
    trace_context: dict[str, str] | None = None,
    run_at: datetime | None = None,
    priority: int | None = None,
    max_duration: timedelta | None = None,
) -> list[str]:
    """Write one task per context, in the caller's transaction; return their UUIDs in order.

    A context whose idempotency key was used before for this template (or earlier in the same
    call) gets that task's UUID, and nothing is written for it. The roots are not claimable
    before ``run_at`` (a time already past means ``now``); ``priority`` is the task's, for the
    steps whose template sets none. ``max_duration`` (else the template's) sets each task's
    ``deadline_at``, counted from its start (``run_at``, else ``now``).
    """
    start = Start(now, run_at if run_at is not None and run_at > now else now, priority)
    duration = max_duration if max_duration is not None else template.max_duration
    # Counted from the start: a delayed task gets its whole duration once it may begin.
    deadline_at = None if duration is None else start.not_before + duration
    keys = list(idempotency_keys) if idempotency_keys is not None else [None] * len(contexts)
    if len(keys) != len(contexts):
        raise ValueError("give one idempotency key (or None) per context")
    known = existing_tasks(conn, template.name, [k for k in keys if k is not None])
    ids: list[str] = []
    task_rows: list[dict[str, Any]] = []
    for index, (context, key) in enumerate(zip(contexts, keys, strict=True)):
        if key is not None and key in known:
            ids.append(known[key])
            continue
        task_id = task_uuids[index] if task_uuids is not None else str(uuid.uuid4())
        if key is not None:
            known[key] = task_id
        ids.append(task_id)
        task_rows.append(
            {
                "task_uuid": task_id,
                "name": template.name,
                "namespace": template.namespace,
                "version": template.version,
                "state": TASK_PENDING,
                "context": context,
                "idempotency_key": key,
                "trace_context": trace_context,
                "deadline_at": deadline_at,
                "created_at": now,
                "updated_at": now,
            }
        )
    _check_item_keys(template, task_rows)
    if task_rows:
        check_limits_exist(conn, template)
    step_rows, edge_rows, transition_rows = _step_rows(template, task_rows, start)
    for statement, rows in (
        (_INSERT_TASKS, task_rows),
        (_INSERT_STEPS, step_rows),
        (_INSERT_EDGES, edge_rows),
        (_INSERT_TRANSITIONS, transition_rows),
    ):
        statement.execute(conn, rows)
    return ids


# One statement per table for the whole submission on PostgreSQL (see ``ColumnInsert``).
_INSERT_TASKS = ColumnInsert(tasks)
_INSERT_STEPS = ColumnInsert(workflow_steps)
_INSERT_EDGES = ColumnInsert(workflow_step_edges)
_INSERT_TRANSITIONS = ColumnInsert(workflow_step_transitions)


def existing_tasks(conn: Connection, name: str, keys: Sequence[str]) -> dict[str, str]:
    """Return {idempotency key: task UUID} for the keys already used by template ``name``."""
    found: dict[str, str] = {}
    unique = sorted(set(keys))
    for start in range(0, len(unique), _MAX_PARAMETERS // 2):
        rows = conn.execute(
            _EXISTING, {"name": name, "keys": unique[start : start + _MAX_PARAMETERS // 2]}
        )
        found.update({key: task_uuid for key, task_uuid in rows})
    return found


_EXISTING = select(tasks.c.idempotency_key, tasks.c.task_uuid).where(
    tasks.c.name == bindparam("name"),
    tasks.c.idempotency_key.in_(bindparam("keys", expanding=True)),
)


class Start(NamedTuple):
    """When a submission is written, when its roots may be claimed, and its priority."""

    now: datetime
    not_before: datetime
    priority: int | None


def _step_rows(
    template: TaskTemplate, task_rows: Sequence[dict[str, Any]], start: Start
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Build the step, edge and transition rows of every new task of ``template``.

    A batch's item step is not written: its batch step creates it once per item, and until
    then whatever depends on it depends on the batch step. A root wait or sleep step starts
    ``waiting``.
    """
    now = start.now
    delayed = start.not_before > now
    reason = f"submitted; scheduled for {start.not_before.isoformat()}" if delayed else "submitted"
    priorities = {
        step.name: template.step_priority(step, start.priority) for step in template.steps
    }
    items = item_steps(template.steps)
    ordered = [step for step in template.topological_order() if step.name not in items]
    parents_of = {step.name: submitted_parents(step, items) for step in ordered}
    specs = {step.name: step_spec(step, template, start.priority) for step in ordered}
    steps: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    transitions: list[dict[str, Any]] = []
    for task in task_rows:
        step_ids = {step.name: str(uuid.uuid4()) for step in ordered}
        for position, step in enumerate(ordered):
            parents = parents_of[step.name]
            waits_until = first_wait_until(step, start.not_before)
            if parents:
                state, not_before = PENDING, None
            elif waits_until is not None:
                state, not_before = WAITING, waits_until.at
            else:
                state, not_before = ENQUEUED, start.not_before
            step_id = step_ids[step.name]
            key, limit = _concurrency(step, task, len(task_rows) > 1)
            steps.append(
                {
                    "step_uuid": step_id,
                    "task_uuid": task["task_uuid"],
                    "namespace": template.namespace,
                    "name": step.name,
                    "handler": step.handler or "",
                    "kind": step.kind,
                    "spec": specs[step.name],
                    "position": position,
                    "state": state,
                    "attempts": 0,
                    "max_attempts": step.max_attempts,
                    "retryable": step.retryable,
                    "timeout_ms": step.timeout_ms,
                    "inputs": step.inputs,
                    "declared_events": [e.model_dump() for e in step.events],
                    "priority": priorities[step.name],
                    "next_attempt_at": not_before,
                    "retry_policy": None if step.retry is None else step.retry.stored(),
                    "concurrency_key": key,
                    "concurrency_limit": limit,
                    **rate_columns(step.rate_limit),
                    "created_at": now,
                    "updated_at": now,
                }
            )
            if state == WAITING and waits_until is not None:
                why = waits_until.reason
            else:
                why = reason if state == ENQUEUED else "submitted"
            transitions.append(
                {
                    "step_uuid": step_id,
                    "from_state": None,
                    "to_state": state,
                    "attempt": 0,
                    "worker_id": None,
                    "reason": why,
                    "created_at": now,
                }
            )
            edges.extend(
                {"from_step_uuid": step_ids[parent], "to_step_uuid": step_id} for parent in parents
            )
    return steps, edges, transitions


def _concurrency(
    step: StepTemplate, task: dict[str, Any], several: bool
) -> tuple[str | None, int | None]:
    """The step's concurrency key for this task's context, and its limit (None: none)."""
    declared = step.concurrency
    if declared is None:
        return None, None
    try:
        return concurrency_key(declared.key, task["context"], step.inputs), declared.limit
    except KeyNotFound as exc:
        which = f"task {task['task_uuid']}" if several else "the task"
        raise InputError(f"step {step.name!r} of {which}: {exc}") from None


def _check_item_keys(template: TaskTemplate, task_rows: Sequence[dict[str, Any]]) -> None:
    """A batch item's key in the task's context must be there (its items are made later)."""
    items = item_steps(template.steps)
    for step in template.steps:
        declared = step.concurrency
        if step.name in items and declared is not None and declared.key.startswith("context."):
            for task in task_rows:
                _concurrency(step, task, len(task_rows) > 1)
