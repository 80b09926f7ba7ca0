"""What each page shows, read from SQL: plain functions from a read connection to the values a
template renders. Parsing of the query string lives here too, so that bad input is one
``InputError`` naming the parameter, before any query runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from duplex.attempts import Attempt, attempts
from duplex.clock import utcnow
from duplex.dashboard.graph import GraphStep, Layout, layout
from duplex.dashboard.timeline import Timeline, timeline
from duplex.errors import InputError
from duplex.states import (
    COMPLETABLE,
    ERROR,
    RESOLVED_MANUALLY,
    STEP_TRANSITIONS,
    TASK_CANCELLED,
    TASK_COMPLETE,
    TASK_STATES,
)
from duplex.storage.batch_view import BatchGroup, ItemPage, batch_groups, item_page, step_note
from duplex.storage.concurrency import KeyLoad, running_per_key
from duplex.storage.dashboard_detail import (
    EventRow,
    StepRow,
    TaskDetail,
    events_of_task,
    step_detail,
    steps_of_task,
    task_detail,
    transitions_of_step,
)
from duplex.storage.dashboard_list import (
    EXECUTION_STATUSES,
    Cursor,
    TaskFilter,
    TaskPage,
    filter_choices,
    status_counts,
    task_page,
)
from duplex.storage.pauses import NAMESPACE, TEMPLATE, Pause, list_pauses
from duplex.storage.queries import parse_uuid, transitions_of_task
from duplex.storage.rate_limits import LimitRow, list_limits
from duplex.storage.workers import judged_workers

# ------------------------------------------------------------------------------------------
# The task list


@dataclass(frozen=True)
class TaskListQuery:
    filter: TaskFilter
    before: Cursor | None
    after: Cursor | None


def parse_task_list_query(params: Mapping[str, str]) -> TaskListQuery:
    """Read the task list's query string; raise ``InputError`` naming a bad parameter."""
    state = _choice(params, "state", TASK_STATES)
    status = _choice(params, "status", EXECUTION_STATUSES)
    since = _time(params, "since")
    until = _time(params, "until")
    if since is not None and until is not None and since >= until:
        raise InputError("since: must be earlier than until")
    flt = TaskFilter(
        state=state,
        execution_status=status,
        name=_text(params, "name"),
        namespace=_text(params, "namespace"),
        since=since,
        until=until,
    )
    before, after = _cursor(params, "before"), _cursor(params, "after")
    if before is not None and after is not None:
        raise InputError("before, after: give one of them, not both")
    return TaskListQuery(flt, before, after)


def filter_params(flt: TaskFilter) -> dict[str, str]:
    """The query-string form of a filter (for the page links)."""
    out = {
        "state": flt.state,
        "status": flt.execution_status,
        "name": flt.name,
        "namespace": flt.namespace,
        "since": _minute(flt.since),
        "until": _minute(flt.until),
    }
    return {key: value for key, value in out.items() if value}


def cursor_text(cursor: Cursor) -> str:
    return f"{cursor.created_at.isoformat()}~{cursor.task_uuid}"


@dataclass(frozen=True)
class TaskList:
    query: TaskListQuery
    page: TaskPage
    counts: dict[str, int]
    names: list[str]
    namespaces: list[str]
    pauses: list[Pause]  # every pause in force, oldest first
    # Flow control (docs/flow-control.md): the busiest concurrency keys, every rate limit.
    keys: list[KeyLoad]
    limits: list[LimitRow]


def task_list(conn: Connection, query: TaskListQuery, *, page_size: int) -> TaskList:
    page = task_page(conn, query.filter, limit=page_size, before=query.before, after=query.after)
    names, namespaces = filter_choices(conn)
    counts = status_counts(conn, query.filter)
    flow = (running_per_key(conn, limit=20), list_limits(conn, now=utcnow()))
    return TaskList(query, page, counts, names, namespaces, list_pauses(conn), *flow)


# ------------------------------------------------------------------------------------------
# One task

# The task page lists the first events; each step's page has its own.
TASK_PAGE_EVENTS = 200


@dataclass(frozen=True)
class TaskView:
    task: TaskDetail
    steps: list[StepRow]
    graph: Layout
    timeline: Timeline
    events: list[EventRow]
    events_total: int
    state_counts: dict[str, int]
    cancellable: bool
    # A batch step's items, counted per state (keyed by the batch step's uuid).
    groups: dict[str, BatchGroup] = field(default_factory=dict)
    # Why a skipped step did not run, what a waiting step waits for (keyed by step uuid).
    notes: dict[str, str] = field(default_factory=dict)
    # The pauses that hold this task's steps back, keyed by kind: its namespace, its template.
    paused: dict[str, Pause] = field(default_factory=dict)


def task_view(conn: Connection, task_uuid: str, *, now: datetime) -> TaskView:
    task = task_detail(conn, task_uuid)
    steps = steps_of_task(conn, task.task_uuid, data=False)
    groups = batch_groups(conn, task.task_uuid)
    graph = layout(graph_steps(steps, groups))
    # Batch items have no lane: their attempts are on their own pages.
    transitions = transitions_of_task(conn, task.task_uuid)
    by_step = attempts(transitions)
    lanes = timeline([(s.step_uuid, s.name) for s in steps], by_step, now=now)
    events, total = events_of_task(conn, task.task_uuid, limit=TASK_PAGE_EVENTS)
    last_reason = {t.step_uuid: t.reason for t in transitions}
    notes = {}
    counts: dict[str, int] = {}
    for step in steps:
        counts[step.state] = counts.get(step.state, 0) + 1
        note = step_note(
            step.state, step.kind, step.spec, step.next_attempt_at, last_reason.get(step.step_uuid)
        )
        if note:
            notes[step.step_uuid] = note
    for group in groups:
        for state, n in group.counts.items():
            counts[state] = counts.get(state, 0) + n
    return TaskView(
        task,
        steps,
        graph,
        lanes,
        events,
        total,
        counts,
        cancellable=task.state not in (TASK_CANCELLED, TASK_COMPLETE),
        groups={g.batch_uuid: g for g in groups},
        notes=notes,
        paused={
            p.kind: p
            for p in list_pauses(conn)
            if (p.kind, p.name) in ((NAMESPACE, task.namespace), (TEMPLATE, task.name))
        },
    )


def items_href(group: BatchGroup, start: int = 0) -> str:
    return f"/steps/{group.batch_uuid}/items" + (f"?from={start}" if start else "")


def graph_steps(steps: list[StepRow], groups: list[BatchGroup]) -> list[GraphStep]:
    """The graph's nodes: each step, and one node per batch for all its items (between the
    batch step and its convergence), however many items there are."""
    nodes = [GraphStep(s.step_uuid, s.name, s.state, tuple(s.parents)) for s in steps]
    by_name = {s.name: i for i, s in enumerate(steps)}
    for group in groups:
        key = f"items-{group.batch_uuid}"
        nodes.append(
            GraphStep(key, group.label, group.state, (group.batch_uuid,), items_href(group))
        )
        for name in group.convergence:
            i = by_name.get(name)
            if i is not None:
                node = nodes[i]
                parents = tuple(p for p in node.parents if p != group.batch_uuid)
                nodes[i] = replace(node, parents=(*parents, key))
    return nodes


@dataclass(frozen=True)
class ItemsView:
    task: TaskDetail
    batch: StepRow
    page: ItemPage


def items_view(conn: Connection, batch_uuid: str, params: Mapping[str, str]) -> ItemsView:
    """One page of a batch step's items (``?from=N``: from item N on)."""
    raw = params.get("from", "0").strip() or "0"
    if not raw.isdigit():
        raise InputError(f"from: not an item number: {raw!r}")
    batch = step_detail(conn, batch_uuid)
    task = task_detail(conn, batch.task_uuid)
    group = next(
        (g for g in batch_groups(conn, task.task_uuid) if g.batch_uuid == batch.step_uuid), None
    )
    if group is None:
        raise InputError(f"step {batch.name} is not a batch step: it has no items")
    return ItemsView(task, batch, item_page(conn, task.task_uuid, group, start=int(raw)))


# ------------------------------------------------------------------------------------------
# One step


@dataclass(frozen=True)
class StepView:
    step: StepRow
    task: TaskDetail
    parents: list[StepRow]
    attempts: list[Attempt]
    events: list[EventRow]
    events_total: int
    retryable: bool
    resolvable: bool
    # Resolvable, and in a state ``duplex complete`` accepts (``duplex.states.COMPLETABLE``).
    completable: bool = False


def step_view(conn: Connection, step_uuid: str) -> StepView:
    step = step_detail(conn, step_uuid)
    task = task_detail(conn, step.task_uuid)
    siblings = {s.step_uuid: s for s in steps_of_task(conn, step.task_uuid, data=False)}
    tried = attempts(transitions_of_step(conn, step.step_uuid)).get(step.step_uuid, [])
    events, total = events_of_task(conn, step.task_uuid, step_uuid=step.step_uuid)
    task_open = task.state != TASK_CANCELLED
    resolvable = task_open and RESOLVED_MANUALLY in STEP_TRANSITIONS.get(step.state, ())
    return StepView(
        step,
        task,
        [siblings[p] for p in step.parents if p in siblings],
        tried,
        events,
        total,
        retryable=task_open and step.state == ERROR,
        resolvable=resolvable,
        completable=resolvable and step.state in COMPLETABLE,
    )


# ------------------------------------------------------------------------------------------
# Workers


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    hostname: str
    pid: int
    state: str
    alive: bool
    why: str
    heartbeat_age_s: float
    started_at: datetime
    running: int | None
    slots: int | None
    committed: Any
    rejected: Any
    recovered: Any
    abandoned: int
    version: str


def workers_view(
    conn: Connection, *, claim_timeout_s: float, now: datetime, limit: int = 200
) -> list[WorkerRow]:
    rows = []
    for row, verdict in judged_workers(conn, claim_timeout_s=claim_timeout_s, now=now, limit=limit):
        stats = row.get("stats") or {}
        dispatcher = stats.get("dispatcher") or {}
        completion = stats.get("completion") or {}
        rows.append(
            WorkerRow(
                worker_id=row["worker_id"],
                hostname=row["hostname"],
                pid=row["pid"],
                state=verdict.state,
                alive=verdict.alive,
                why=verdict.why,
                heartbeat_age_s=max(0.0, (now - row["heartbeat_at"]).total_seconds()),
                started_at=row["started_at"],
                running=dispatcher.get("running") if verdict.alive else None,
                slots=stats.get("slots"),
                committed=completion.get("committed", "-"),
                rejected=completion.get("rejected", "-"),
                recovered=completion.get("recovered", "-"),
                abandoned=int(dispatcher.get("abandoned_threads", 0) or 0),
                version=str(stats.get("version", "?")),
            )
        )
    return rows


# ------------------------------------------------------------------------------------------
# Parsing helpers


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def _choice(params: Mapping[str, str], key: str, allowed: tuple[str, ...]) -> str | None:
    value = params.get(key, "").strip()
    if not value:
        return None
    if value not in allowed:
        raise InputError(f"{key}: unknown value {value!r}; one of {', '.join(allowed)}")
    return value


def _text(params: Mapping[str, str], key: str) -> str | None:
    value = params.get(key, "").strip()
    if len(value) > 255:
        raise InputError(f"{key}: longer than 255 characters")
    return value or None


def _time(params: Mapping[str, str], key: str) -> datetime | None:
    value = params.get(key, "").strip()
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InputError(
            f"{key}: not a date and time: {value!r} (e.g. 2026-12-02T10:30, read as UTC)"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _minute(moment: datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%dT%H:%M") if moment is not None else None


def _cursor(params: Mapping[str, str], key: str) -> Cursor | None:
    value = params.get(key, "").strip()
    if not value:
        return None
    created, sep, task_uuid = value.rpartition("~")
    try:
        moment = datetime.fromisoformat(created) if sep else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise InputError(f"{key}: not a page position: {value!r}")
    try:
        task_id = parse_uuid(task_uuid, "task")
    except InputError:
        # Bad input of this parameter (400), not an unknown task (404).
        raise InputError(
            f"{key}: not a page position: {value!r} ({task_uuid!r} is not a UUID)"
        ) from None
    return Cursor(moment.astimezone(UTC), task_id)
