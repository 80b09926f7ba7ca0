"""What a finished step sets in motion, in the transaction that finished it.

``advance`` is the one place that moves a task forward: it creates a batch's item steps,
skips the branches a decision did not choose (and every step that then has only skipped
parents), makes ready the steps whose parents are all done, and starts the wait and sleep
steps among them, completing at once a wait whose signal is already in (and going on from
there). The commit of results, a signal, the end of a wait and the operator commands all
call it, so all of them move a task the same way (docs/workflows.md).

A skipped parent counts as done: a convergence step runs once each parent ran, was resolved
or was skipped. A step is skipped only when every parent it has was skipped.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from duplex.dynamic.kinds import WAIT, WAITS
from duplex.dynamic.specs import wait_until
from duplex.flow.concurrency import concurrency_key
from duplex.messages import JSONDict
from duplex.states import COMPLETE, ENQUEUED, PENDING, SKIPPED, WAITING
from duplex.storage.driver import ColumnInsert, db_time
from duplex.storage.models import (
    step_signals,
    tasks,
    unindexed,
    workflow_step_edges,
    workflow_steps,
)
from duplex.storage.rate_limits import rate_columns
from duplex.storage.readiness import (
    ReadyStep,
    enqueue_ready_dependents,
    pending_children_whose_parents_are_all,
)
from duplex.storage.transitions import TransitionRow, transition_row

ws = workflow_steps
edges = workflow_step_edges


@dataclass(frozen=True, slots=True)
class Decided:
    """A decision step just completed, and the branches it chose."""

    step_uuid: str
    task_uuid: str
    name: str
    branches: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BatchMade:
    """A batch step just completed, and the items its handler returned."""

    step_uuid: str
    task_uuid: str
    name: str
    items: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class SignalledWait:
    """A wait step completed by a signal that was already in when it started."""

    step_uuid: str
    task_uuid: str
    name: str
    result: JSONDict
    declared_events: Any


@dataclass
class Progress:
    """What ``advance`` did: the handler steps now ready (to claim, to announce), the
    transition rows to write, and the waits a signal already in completed."""

    ready: list[ReadyStep] = field(default_factory=list)
    transitions: list[TransitionRow] = field(default_factory=list)
    skipped: int = 0
    items_created: int = 0
    waits_started: int = 0
    signalled: list[SignalledWait] = field(default_factory=list)


def advance(
    conn: Connection,
    *,
    completed: Iterable[str],
    now: datetime,
    decisions: Sequence[Decided] = (),
    batches: Sequence[BatchMade] = (),
    worker_id: str | None = None,
) -> Progress:
    """Move the tasks of ``completed`` steps (and of these decisions and batches) forward.

    Call it with the tasks locked, after the steps' own rows are written; write
    ``progress.transitions`` and bring the task states up to date afterwards.
    """
    progress = Progress()
    at = db_time(conn.dialect, now)
    parents = list(completed)
    if batches:
        _create_items(conn, batches, now=now, at=at, worker_id=worker_id, progress=progress)
    for decided in decisions:
        parents.extend(_skip_unchosen(conn, decided, now=now, at=at, progress=progress))
    while parents:
        ready = enqueue_ready_dependents(conn, parents, now=now)
        parents = []
        waits = [step for step in ready if step.kind in WAITS]
        for step in ready:
            if step.kind not in WAITS:
                progress.ready.append(step)
                progress.transitions.append(
                    transition_row(
                        step.step_uuid, PENDING, ENQUEUED, 0, None, at, "dependencies complete"
                    )
                )
        if waits:
            # A wait whose signal is already in completes now, and its dependents go on.
            parents = _start_waits(conn, waits, now=now, at=at, progress=progress)
    progress.ready.sort()
    return progress


# --- batches --------------------------------------------------------------------------------

_INSERT_STEPS = ColumnInsert(ws)
_INSERT_EDGES = ColumnInsert(edges)
_BATCH_ROWS = select(ws.c.step_uuid, ws.c.namespace, ws.c.position, ws.c.spec).where(
    ws.c.step_uuid.in_(bindparam("ids", expanding=True))
)
_STEPS_BY_NAME = select(ws.c.step_uuid).where(
    ws.c.task_uuid == bindparam("task_uuid"), ws.c.name.in_(bindparam("names", expanding=True))
)


# Items are written this many at a time, all in the one transaction: the rows of a 100,000-item
# batch are never built at once (about 2 KiB each as parameters).
_ITEMS_PER_WRITE = 1000


def _create_items(
    conn: Connection,
    batches: Sequence[BatchMade],
    *,
    now: datetime,
    at: Any,
    worker_id: str | None,
    progress: Progress,
) -> None:
    """Create each batch's item steps, ready to claim, with their edges: from the batch step,
    and to each convergence step, which so waits for every item (and runs at once for none)."""
    ids = [batch.step_uuid for batch in batches]
    rows = {row.step_uuid: row for row in conn.execute(_BATCH_ROWS, {"ids": ids})}
    for batch in batches:
        row = rows[batch.step_uuid]
        spec = row.spec or {}
        worker = spec.get("worker") or {}
        names = list(spec.get("convergence") or ())
        convergence = (
            list(
                conn.execute(
                    _STEPS_BY_NAME, {"task_uuid": batch.task_uuid, "names": names}
                ).scalars()
            )
            if names
            else []
        )
        why = f"created by batch {batch.name}"
        item_key = _item_key(conn, batch.task_uuid, worker)
        for first in range(0, len(batch.items), _ITEMS_PER_WRITE):
            steps: list[dict[str, Any]] = []
            new_edges: list[dict[str, Any]] = []
            chunk = batch.items[first : first + _ITEMS_PER_WRITE]
            for index, item in enumerate(chunk, start=first):
                item_uuid = str(uuid.uuid4())
                steps.append(
                    {
                        "step_uuid": item_uuid,
                        "task_uuid": batch.task_uuid,
                        "namespace": row.namespace,
                        "name": f"{worker['name']}[{index}]",
                        "handler": worker["handler"],
                        "kind": "handler",
                        "spec": None,
                        "position": row.position,
                        "item_index": index,
                        "state": ENQUEUED,
                        "attempts": 0,
                        "max_attempts": worker["max_attempts"],
                        "retryable": worker["retryable"],
                        "timeout_ms": worker.get("timeout_ms"),
                        "inputs": {**(worker.get("inputs") or {}), "item": item},
                        "declared_events": worker.get("declared_events") or [],
                        "priority": worker.get("priority", 0),
                        "next_attempt_at": now,
                        "retry_policy": worker.get("retry_policy"),
                        **item_key(item),
                        **rate_columns(worker.get("rate_limit")),
                        "created_at": now,
                        "updated_at": now,
                    }
                )
                new_edges.append({"from_step_uuid": batch.step_uuid, "to_step_uuid": item_uuid})
                new_edges.extend(
                    {"from_step_uuid": item_uuid, "to_step_uuid": target} for target in convergence
                )
                limited = bool(worker.get("concurrency") or worker.get("rate_limit"))
                priority = worker.get("priority", 0)
                progress.ready.append(
                    ReadyStep(
                        item_uuid, row.namespace, priority, "handler", limited, batch.task_uuid
                    )
                )
                progress.transitions.append(
                    transition_row(item_uuid, None, ENQUEUED, 0, worker_id, at, why)
                )
            _INSERT_STEPS.execute(conn, steps)
            _INSERT_EDGES.execute(conn, new_edges)
        progress.items_created += len(batch.items)


# --- decisions ------------------------------------------------------------------------------

_NOW = bindparam("now", type_=ws.c.updated_at.type)

_SKIP_BRANCHES = (
    update(ws)
    .where(
        ws.c.task_uuid == bindparam("b_task_uuid"),
        ws.c.name.in_(bindparam("names", expanding=True)),
        unindexed(ws.c.state) == PENDING,
    )
    .values(state=SKIPPED, completed_at=_NOW, updated_at=_NOW)
    .returning(ws.c.step_uuid)
)
# Pending children of just-skipped steps whose every parent is skipped.
_SKIP_ORPHANS = (
    update(ws)
    .where(*pending_children_whose_parents_are_all((SKIPPED,)))
    .values(state=SKIPPED, completed_at=_NOW, updated_at=_NOW)
    .returning(ws.c.step_uuid)
)


def _item_key(
    conn: Connection, task_uuid: str, worker: dict[str, Any]
) -> Callable[[Any], dict[str, Any]]:
    """The concurrency key and limit columns of an item, from its task's context and its
    inputs (the item step's, and the item): submission checked the context and the template
    the item step's inputs, the batch's result each item."""
    declared = worker.get("concurrency")
    if not declared:
        return lambda item: {"concurrency_key": None, "concurrency_limit": None}
    path, limit, inputs = declared["key"], declared["limit"], worker.get("inputs") or {}
    context: dict[str, Any] = {}
    if path.startswith("context."):
        context = conn.execute(_TASK_CONTEXT, {"task_uuid": task_uuid}).scalar_one() or {}
    return lambda item: {
        "concurrency_key": concurrency_key(path, context, {**inputs, "item": item}),
        "concurrency_limit": limit,
    }


_TASK_CONTEXT = select(tasks.c.context).where(tasks.c.task_uuid == bindparam("task_uuid"))


def _skip_unchosen(
    conn: Connection, decided: Decided, *, now: datetime, at: Any, progress: Progress
) -> list[str]:
    """Skip the branches ``decided`` did not choose, then every pending step whose parents
    are all skipped; return every step skipped (their children may now be ready)."""
    row = conn.execute(select(ws.c.spec).where(ws.c.step_uuid == decided.step_uuid)).one()
    declared = list((row.spec or {}).get("branches") or ())
    unchosen = [name for name in declared if name not in decided.branches]
    if not unchosen:
        return []
    skipped = [
        r.step_uuid
        for r in conn.execute(
            _SKIP_BRANCHES, {"b_task_uuid": decided.task_uuid, "names": unchosen, "now": now}
        )
    ]
    why = f"not chosen by decision {decided.name}"
    frontier = skipped
    every = list(skipped)
    while frontier:
        progress.transitions.extend(
            transition_row(step_uuid, PENDING, SKIPPED, 0, None, at, why) for step_uuid in frontier
        )
        frontier = [
            r.step_uuid for r in conn.execute(_SKIP_ORPHANS, {"parents": frontier, "now": now})
        ]
        why = f"every dependency skipped (decision {decided.name})"
        every.extend(frontier)
    progress.skipped += len(every)
    return every


# --- waits ----------------------------------------------------------------------------------

_WAIT_ROWS = select(
    ws.c.step_uuid, ws.c.task_uuid, ws.c.name, ws.c.kind, ws.c.spec, ws.c.declared_events
).where(ws.c.step_uuid.in_(bindparam("ids", expanding=True)))
_START_WAIT = (
    update(ws)
    .where(ws.c.step_uuid == bindparam("b_step_uuid"), unindexed(ws.c.state) == ENQUEUED)
    .values(
        state=WAITING,
        next_attempt_at=bindparam("v_until", type_=ws.c.next_attempt_at.type),
        updated_at=bindparam("v_now", type_=ws.c.updated_at.type),
    )
)
_SIGNAL_IN = (
    select(step_signals.c.id, step_signals.c.payload)
    .where(
        step_signals.c.task_uuid == bindparam("task_uuid"),
        step_signals.c.name == bindparam("name"),
        step_signals.c.used_at.is_(None),
    )
    .order_by(step_signals.c.id)
    .limit(1)
)


def _start_waits(
    conn: Connection, waits: Sequence[ReadyStep], *, now: datetime, at: Any, progress: Progress
) -> list[str]:
    """Start the wait and sleep steps just made ready (``enqueue_ready_dependents`` made them
    ``enqueued``; in this same transaction, so no one claims them); return the waits a signal
    already in completed."""
    completed: list[str] = []
    for row in conn.execute(_WAIT_ROWS, {"ids": [w.step_uuid for w in waits]}):
        until = wait_until(row.kind, row.spec, now)
        assert until is not None
        conn.execute(
            _START_WAIT,
            {"b_step_uuid": row.step_uuid, "v_until": until.at, "v_now": now},
        )
        progress.transitions.append(
            transition_row(row.step_uuid, PENDING, WAITING, 0, None, at, until.reason)
        )
        progress.waits_started += 1
        if row.kind != WAIT:
            continue
        signal_name = (row.spec or {}).get("signal")
        signal = conn.execute(_SIGNAL_IN, {"task_uuid": row.task_uuid, "name": signal_name}).first()
        if signal is None:
            continue
        result = signal.payload if isinstance(signal.payload, dict) else {"payload": signal.payload}
        complete_wait(conn, row.step_uuid, signal.id, result, now=now)
        progress.transitions.append(
            transition_row(
                row.step_uuid, WAITING, COMPLETE, 0, None, at, f"signal {signal_name} received"
            )
        )
        progress.signalled.append(
            SignalledWait(row.step_uuid, row.task_uuid, row.name, result, row.declared_events)
        )
        completed.append(row.step_uuid)
    return completed


_COMPLETE_WAIT = (
    update(ws)
    .where(ws.c.step_uuid == bindparam("b_step_uuid"), unindexed(ws.c.state) == WAITING)
    .values(
        state=COMPLETE,
        results=bindparam("v_results", type_=ws.c.results.type),
        next_attempt_at=None,
        completed_at=bindparam("v_now", type_=ws.c.completed_at.type),
        updated_at=bindparam("v_now", type_=ws.c.updated_at.type),
    )
)
_USE_SIGNAL = (
    update(step_signals)
    .where(step_signals.c.id == bindparam("b_id"))
    .values(
        step_uuid=bindparam("v_step_uuid"),
        used_at=bindparam("v_now", type_=step_signals.c.used_at.type),
    )
)


def complete_wait(
    conn: Connection, step_uuid: str, signal_id: int, result: JSONDict, *, now: datetime
) -> None:
    """Complete a ``waiting`` wait step with a signal's payload, and mark the signal used."""
    conn.execute(_COMPLETE_WAIT, {"b_step_uuid": step_uuid, "v_results": result, "v_now": now})
    conn.execute(_USE_SIGNAL, {"b_id": signal_id, "v_step_uuid": step_uuid, "v_now": now})
