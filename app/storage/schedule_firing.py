"""Firing due schedules: each fire time's task and the schedule's advance in ONE transaction.

**Why each fire time creates exactly one task, however many firers race** (docs/time.md,
Schedules):

1. ``fire_due`` runs in one write transaction. The due rows are read locked: ``FOR UPDATE
   SKIP LOCKED`` on PostgreSQL (a second firer skips them, and one that reads after the
   commit finds them advanced, PostgreSQL re-checking the condition on the newest row),
   ``BEGIN IMMEDIATE`` on SQLite (one writer at a time).
2. The task, the fire row, the ``schedule.fired`` event and the schedule's new
   ``next_fire_at`` are written together: a firer that dies before its commit leaves none of
   them, one that commits leaves all of them.
3. The advance is guarded: it updates the row only if ``next_fire_at`` and
   ``buffered_fire_at`` are still what this firer read, else the whole batch rolls back.
4. Two more guards hold even if 1-3 were bypassed: the task's idempotency key
   ``schedule:NAME@<fire time>`` is unique per template (a key already used returns the
   first task, and nothing is written), and ``schedule_fires`` is unique per (schedule,
   fire time).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Connection, bindparam, delete, false, func, insert, select, update

from duplex.errors import StorageError
from duplex.messages import DomainEvent
from duplex.schedules.firing import DueSchedule, FirePlan, fire_time_text, idempotency_key, plan
from duplex.states import TASK_CANCELLED, TASK_COMPLETE, TASK_ERROR
from duplex.storage.driver import BulkStatement, ColumnInsert, db_time
from duplex.storage.listen import notify_new_events
from duplex.storage.models import domain_events, schedule_fires, schedules, tasks
from duplex.storage.schedules import Schedule, schedule_of_row
from duplex.storage.submission import create_tasks, existing_tasks
from duplex.templates import TaskTemplate

sc = schedules
_ENDED = (TASK_COMPLETE, TASK_ERROR, TASK_CANCELLED)


@dataclass(frozen=True, slots=True)
class Fired:
    """A fire time that created its task."""

    schedule: str
    fire_at: datetime
    task_uuid: str
    namespace: str
    late: timedelta  # from the fire time to the commit's clock


@dataclass
class FireReport:
    """What one ``fire_due`` transaction did."""

    fired: list[Fired] = field(default_factory=list)
    skipped: list[tuple[str, datetime]] = field(default_factory=list)
    missed: list[tuple[str, int]] = field(default_factory=list)
    events: list[DomainEvent] = field(default_factory=list)
    acted: int = 0  # schedules whose row changed: when it is the limit, more may be due

    @property
    def namespaces(self) -> set[str]:
        return {fired.namespace for fired in self.fired}


def fire_due(
    conn: Connection,
    *,
    now: datetime,
    worker_id: str | None,
    limit: int = 100,
    keep_fires: int = 1000,
    after_tasks_written: Callable[[], None] | None = None,
) -> FireReport:
    """Act on up to ``limit`` due schedules, one fire time each, in the caller's write
    transaction; keep each one's newest ``keep_fires`` fire rows. ``after_tasks_written``
    runs between the tasks' insert and the schedules' advance (tests kill a firer there)."""
    report = FireReport()
    rows = _due_rows(conn, now, limit)
    if not rows:
        return report
    open_runs = _open_runs(conn, [row.last_task_uuid for row in rows if row.last_task_uuid])
    plans: list[tuple[Schedule, FirePlan]] = []
    for row in rows:
        due = DueSchedule(
            row.name,
            row.spec,
            row.overlap,
            row.catchup,
            row.next_fire_at,
            row.buffered_fire_at,
            previous_run_open=row.last_task_uuid in open_runs,
        )
        decided = plan(due, now)
        if decided.changes_anything or decided.buffered_fire_at != row.buffered_fire_at:
            plans.append((row, decided))
    task_of = _write_tasks(conn, [(row, p.fire_at) for row, p in plans if p.fire_at], now, report)
    if after_tasks_written is not None:
        after_tasks_written()
    fire_rows: list[dict[str, Any]] = []
    _advance(conn, plans, task_of, now)
    for row, decided in plans:
        report.acted += 1
        record = {"schedule_name": row.name, "worker_id": worker_id, "recorded_at": now}
        if decided.missed is not None:
            missed = decided.missed
            fire_rows.append(
                {
                    **record,
                    "fire_at": missed.first,
                    "outcome": "missed",
                    "fires": missed.count,
                    "task_uuid": None,
                    "detail": missed.describe(row.catchup),
                }
            )
            report.missed.append((row.name, missed.count))
        if decided.skipped is not None:
            fire_rows.append(
                {
                    **record,
                    "fire_at": decided.skipped,
                    "outcome": "skipped",
                    "fires": 1,
                    "task_uuid": None,
                    "detail": f"previous run {row.last_task_uuid} not finished",
                }
            )
            report.skipped.append((row.name, decided.skipped))
        if decided.fire_at is not None:
            fire_rows.append(
                {
                    **record,
                    "fire_at": decided.fire_at,
                    "outcome": "fired",
                    "fires": 1,
                    "task_uuid": task_of[row.name],
                    "detail": None,
                }
            )
    if fire_rows:
        _INSERT_FIRES.execute(conn, fire_rows)
        names = sorted({row["schedule_name"] for row in fire_rows})
        conn.execute(_TRIM_FIRES, [{"name": name, "keep": keep_fires} for name in names])
    return report


def has_due(conn: Connection, *, now: datetime) -> bool:
    """Whether any schedule is due (read-only): a firer opens a write transaction only then,
    since on SQLite an empty write would make every commit of the workers wait."""
    if conn.execute(_DUE.with_only_columns(sc.c.name).limit(1), {"now": now}).first():
        return True
    held = _HELD.with_only_columns(sc.c.name).limit(1)
    return conn.execute(held, {"ended": list(_ENDED)}).first() is not None


def _due_rows(conn: Connection, now: datetime, limit: int) -> list[Schedule]:
    """Due schedules, locked: a fire time that has come, or a held-back fire whose previous
    run has ended."""
    pg = conn.dialect.name == "postgresql"
    by_time = _DUE.limit(limit)
    held = _HELD.limit(limit)
    if pg:
        by_time = by_time.with_for_update(skip_locked=True)
        held = held.with_for_update(skip_locked=True, of=sc)
    found = {row.name: row for row in conn.execute(held, {"ended": list(_ENDED)})}
    for row in conn.execute(by_time, {"now": now}):
        found.setdefault(row.name, row)
    return [schedule_of_row(row) for row in list(found.values())[:limit]]


_DUE = (
    select(sc)
    .where(
        sc.c.paused == false(), sc.c.next_fire_at <= bindparam("now", type_=sc.c.next_fire_at.type)
    )
    .order_by(sc.c.next_fire_at)
)
_HELD = (
    select(sc)
    .join(tasks, tasks.c.task_uuid == sc.c.last_task_uuid, isouter=True)
    .where(
        sc.c.paused == false(),
        sc.c.buffered_fire_at.is_not(None),
        (tasks.c.state.in_(bindparam("ended", expanding=True))) | tasks.c.task_uuid.is_(None),
    )
    .order_by(sc.c.buffered_fire_at)
)


def _open_runs(conn: Connection, task_uuids: list[str]) -> set[str]:
    """Which of these tasks have not ended (a task pruned away has ended)."""
    if not task_uuids:
        return set()
    query = select(tasks.c.task_uuid).where(
        tasks.c.task_uuid.in_(sorted(set(task_uuids))), tasks.c.state.not_in(_ENDED)
    )
    return set(conn.execute(query).scalars())


def _write_tasks(
    conn: Connection,
    fires: list[tuple[Schedule, datetime | None]],
    now: datetime,
    report: FireReport,
) -> dict[str, str]:
    """Create each fire time's task, with one ``schedule.fired`` event each; return
    {schedule: task UUID}. Schedules of the same template definition share one insert."""
    groups: dict[str, list[tuple[Schedule, datetime]]] = {}
    for row, fire_at in fires:
        assert fire_at is not None
        groups.setdefault(json.dumps(row.template, sort_keys=True), []).append((row, fire_at))
    task_of: dict[str, str] = {}
    events: list[DomainEvent] = []
    for group in groups.values():
        template = TaskTemplate.model_validate(group[0][0].template)
        keys = [idempotency_key(row.name, fire_at) for row, fire_at in group]
        # A key already used (a schedule removed and added again under its name) is that
        # fire time's task: it is not created, nor announced, twice.
        known = existing_tasks(conn, template.name, keys)
        ids = create_tasks(
            conn, template, [row.context for row, _ in group], now=now, idempotency_keys=keys
        )
        for (row, fire_at), key, task_uuid in zip(group, keys, ids, strict=True):
            task_of[row.name] = task_uuid
            report.fired.append(
                Fired(row.name, fire_at, task_uuid, template.namespace, now - fire_at)
            )
            if key in known:
                continue
            payload = {
                "schedule": row.name,
                "fire_at": fire_time_text(fire_at),
                "template": template.name,
                "task_uuid": task_uuid,
            }
            # Sequence 1: the task was created in this transaction, no one else has seen it.
            events.append(
                DomainEvent(str(uuid.uuid4()), "schedule.fired", task_uuid, None, payload, now, 1)
            )
    if events:
        conn.execute(
            insert(domain_events),
            [
                {
                    "event_id": e.event_id,
                    "name": e.name,
                    "task_uuid": e.task_uuid,
                    "step_uuid": None,
                    "payload": e.payload,
                    "created_at": now,
                    "sequence": 1,
                }
                for e in events
            ],
        )
        notify_new_events(conn, events)
        report.events.extend(events)
    return task_of


def _advance(
    conn: Connection,
    plans: list[tuple[Schedule, FirePlan]],
    task_of: dict[str, str],
    now: datetime,
) -> None:
    """Move the schedules on, each guarded by what was read; a mismatch rolls the batch back."""
    if not plans:
        return
    at = partial(db_time, conn.dialect)
    rows = [
        (
            at(decided.next_fire_at),
            at(decided.buffered_fire_at),
            at(decided.fire_at),
            task_of.get(row.name) if decided.fire_at is not None else None,
            at(now),
            row.name,
            at(row.next_fire_at),
            at(row.buffered_fire_at),
        )
        for row, decided in plans
    ]
    matched = _ADVANCE.execute(conn, rows)
    if conn.dialect.supports_sane_multi_rowcount and matched != len(rows):
        raise StorageError(
            f"{len(rows) - matched} schedule(s) changed while they were being fired; "
            "the batch is rolled back",
            transient=True,
        )


# One statement for the whole batch (from 8 rows, an array update on PostgreSQL). The guard:
# the row is still as this firer read it (``IS NOT DISTINCT FROM``: a NULL held-back fire
# matches NULL).
_ADVANCE = BulkStatement(
    update(sc)
    .where(
        sc.c.name == bindparam("b_name"),
        sc.c.next_fire_at == bindparam("b_next_fire_at", type_=sc.c.next_fire_at.type),
        sc.c.buffered_fire_at.is_not_distinct_from(
            bindparam("b_buffered_fire_at", type_=sc.c.buffered_fire_at.type)
        ),
    )
    .values(
        next_fire_at=bindparam("v_next_fire_at", type_=sc.c.next_fire_at.type),
        buffered_fire_at=bindparam("v_buffered_fire_at", type_=sc.c.buffered_fire_at.type),
        # Only a fire moves the last fire on.
        last_fire_at=func.coalesce(
            bindparam("v_last_fire_at", type_=sc.c.last_fire_at.type), sc.c.last_fire_at
        ),
        last_task_uuid=func.coalesce(
            bindparam("v_last_task_uuid", type_=sc.c.last_task_uuid.type), sc.c.last_task_uuid
        ),
        updated_at=bindparam("v_updated_at", type_=sc.c.updated_at.type),
    ),
    (
        "v_next_fire_at",
        "v_buffered_fire_at",
        "v_last_fire_at",
        "v_last_task_uuid",
        "v_updated_at",
        "b_name",
        "b_next_fire_at",
        "b_buffered_fire_at",
    ),
)
_INSERT_FIRES = ColumnInsert(schedule_fires)

# A schedule's fire rows beyond its newest ``keep``: the one at offset ``keep`` (newest first)
# and all older; one probe of the (schedule_name, fire_at) index, nothing deleted while there
# are no more than ``keep`` (the subquery is NULL).
sf = schedule_fires
_TRIM_FIRES = delete(sf).where(
    sf.c.schedule_name == bindparam("name"),
    sf.c.fire_at
    <= (
        select(sf.c.fire_at)
        .where(sf.c.schedule_name == bindparam("name"))
        .order_by(sf.c.fire_at.desc())
        .limit(1)
        .offset(bindparam("keep"))
        .scalar_subquery()
    ),
)
