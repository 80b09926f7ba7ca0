"""The ``schedules`` rows: add, replace, pause, resume, remove, list, and the fire history.

Firing itself (the one transaction that writes a fire time's task and advances the schedule)
is in ``duplex.storage.schedule_firing``. Every function runs in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from duplex.schedules.declaration import ScheduleDeclaration
from duplex.schedules.firing import first_fire_after
from duplex.schedules.spec import ScheduleSpec
from duplex.storage.models import schedule_fires, schedules
from duplex.templates import TaskTemplate

sc = schedules
sf = schedule_fires


@dataclass(frozen=True, slots=True)
class Schedule:
    """One ``schedules`` row."""

    name: str
    template_name: str
    template: dict[str, Any]
    context: dict[str, Any]
    cron: str | None
    every_ms: int | None
    timezone: str
    overlap: str
    catchup_ms: int
    paused: bool
    next_fire_at: datetime
    buffered_fire_at: datetime | None
    last_fire_at: datetime | None
    last_task_uuid: str | None
    declared_in: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def spec(self) -> ScheduleSpec:
        return ScheduleSpec(cron=self.cron, every_ms=self.every_ms, timezone=self.timezone)

    @property
    def catchup(self) -> timedelta:
        return timedelta(milliseconds=self.catchup_ms)

    def as_json(self) -> dict[str, Any]:
        """The row for ``--json`` output and the dashboard (the template by name only)."""
        return {
            "name": self.name,
            "template": self.template_name,
            "context": self.context,
            "cron": self.cron,
            "every_ms": self.every_ms,
            "timezone": self.timezone,
            "overlap": self.overlap,
            "catchup_ms": self.catchup_ms,
            "paused": self.paused,
            "next_fire_at": self.next_fire_at.isoformat(),
            "buffered_fire_at": _iso(self.buffered_fire_at),
            "last_fire_at": _iso(self.last_fire_at),
            "last_task_uuid": self.last_task_uuid,
            "declared_in": self.declared_in,
        }


@dataclass(frozen=True, slots=True)
class ScheduleFire:
    """One ``schedule_fires`` row: what a fire time (or a missed range) came to."""

    schedule_name: str
    fire_at: datetime
    outcome: str  # fired | skipped | missed
    fires: int
    task_uuid: str | None
    detail: str | None
    worker_id: str | None
    recorded_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "fire_at": self.fire_at.isoformat(),
            "outcome": self.outcome,
            "fires": self.fires,
            "task_uuid": self.task_uuid,
            "detail": self.detail,
            "worker_id": self.worker_id,
            "recorded_at": self.recorded_at.isoformat(),
        }


def schedule_of_row(row: Any) -> Schedule:
    return Schedule(**{name: getattr(row, name) for name in Schedule.__slots__})


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _values(
    declaration: ScheduleDeclaration, template: TaskTemplate, declared_in: str | None
) -> dict[str, Any]:
    spec = declaration.spec
    return {
        "template_name": template.name,
        "template": template.model_dump(mode="json", exclude={"schedules"}),
        "context": declaration.context,
        "cron": spec.cron,
        "every_ms": spec.every_ms,
        "timezone": spec.timezone,
        "overlap": declaration.overlap,
        "catchup_ms": declaration.catchup_window // timedelta(milliseconds=1),
        "declared_in": declared_in,
    }


def get_schedule(conn: Connection, name: str, *, lock: bool = False) -> Schedule | None:
    query = select(sc).where(sc.c.name == name)
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query).first()
    return None if row is None else schedule_of_row(row)


def list_schedules(conn: Connection) -> list[Schedule]:
    return [schedule_of_row(row) for row in conn.execute(select(sc).order_by(sc.c.name))]


def save_schedule(
    conn: Connection,
    declaration: ScheduleDeclaration,
    template: TaskTemplate,
    *,
    now: datetime,
    declared_in: str | None = None,
) -> tuple[Schedule, str]:
    """Add the schedule, or bring an existing one of that name up to the declaration.

    Return the row and ``added``, ``updated`` or ``unchanged``. A changed cron, interval or
    zone starts over from the first fire time after ``now`` (and drops a held-back fire); the
    paused state of an existing schedule is the operator's and is kept.
    """
    values = _values(declaration, template, declared_in)
    existing = get_schedule(conn, declaration.name, lock=True)
    if existing is None:
        conn.execute(
            insert(sc).values(
                name=declaration.name,
                paused=declaration.paused,
                next_fire_at=first_fire_after(declaration.spec, now),
                created_at=now,
                updated_at=now,
                **values,
            )
        )
        added = get_schedule(conn, declaration.name)
        assert added is not None
        return added, "added"
    if all(getattr(existing, key) == value for key, value in values.items()):
        return existing, "unchanged"
    if existing.spec != declaration.spec:
        values["next_fire_at"] = first_fire_after(declaration.spec, now)
        values["buffered_fire_at"] = None
    conn.execute(update(sc).where(sc.c.name == declaration.name).values(updated_at=now, **values))
    updated = get_schedule(conn, declaration.name)
    assert updated is not None
    return updated, "updated"


def set_paused(conn: Connection, name: str, paused: bool, *, now: datetime) -> Schedule | None:
    """Pause or resume; return the row, or None when there is no such schedule.

    A pause drops a held-back fire; a resume starts from the first fire time after ``now``:
    the fire times that passed while paused are neither fired nor recorded as missed.
    """
    existing = get_schedule(conn, name, lock=True)
    if existing is None:
        return None
    if existing.paused == paused:
        return existing
    values: dict[str, Any] = {"paused": paused, "updated_at": now}
    if paused:
        values["buffered_fire_at"] = None
    else:
        values["next_fire_at"] = first_fire_after(existing.spec, now)
    conn.execute(update(sc).where(sc.c.name == name).values(**values))
    return get_schedule(conn, name)


def delete_schedule(conn: Connection, name: str) -> bool:
    """Remove the schedule and its fire history; return whether it existed.

    The tasks it fired stay. Added again under the same name, it does not fire a second
    task for a fire time already fired: the idempotency key finds the first.
    """
    conn.execute(delete(sf).where(sf.c.schedule_name == name))
    return bool(conn.execute(delete(sc).where(sc.c.name == name)).rowcount)


def declared_names(conn: Connection, template_name: str) -> list[str]:
    """The schedules that template ``template_name`` declared when it was last synced."""
    query = select(sc.c.name).where(sc.c.declared_in == template_name).order_by(sc.c.name)
    return list(conn.execute(query).scalars())


def recent_fires(
    conn: Connection, names: Iterable[str], *, per_schedule: int
) -> dict[str, list[ScheduleFire]]:
    """The last ``per_schedule`` fire rows of each schedule, newest first."""
    found: dict[str, list[ScheduleFire]] = {}
    for name in names:
        rows = conn.execute(
            select(sf)
            .where(sf.c.schedule_name == name)
            .order_by(sf.c.fire_at.desc())
            .limit(per_schedule)
        )
        found[name] = [
            ScheduleFire(**{key: getattr(row, key) for key in ScheduleFire.__slots__})
            for row in rows
        ]
    return found


def fire_counts(conn: Connection, name: str) -> dict[str, int]:
    """How many fire times of schedule ``name`` were fired, skipped and missed."""
    query = (
        select(sf.c.outcome, func.sum(sf.c.fires))
        .where(sf.c.schedule_name == name)
        .group_by(sf.c.outcome)
    )
    counts = {"fired": 0, "skipped": 0, "missed": 0}
    counts.update({outcome: int(total or 0) for outcome, total in conn.execute(query)})
    return counts


def fired_tasks(conn: Connection, names: Sequence[str] | None = None) -> list[tuple[str, Any, str]]:
    """Every fired row as (schedule, fire time, task UUID), for checks and the benchmark."""
    query = select(sf.c.schedule_name, sf.c.fire_at, sf.c.task_uuid).where(sf.c.outcome == "fired")
    if names is not None:
        query = query.where(sf.c.schedule_name.in_(list(names)))
    return [tuple(row) for row in conn.execute(query.order_by(sf.c.schedule_name, sf.c.fire_at))]


def sync_declared(conn: Connection, template: TaskTemplate, *, now: datetime) -> dict[str, int]:
    """Bring the schedules that ``template`` declares (``[[schedules]]``) into the table.

    Each is added or brought up to date (``save_schedule``; a paused one stays paused); a
    schedule this template declared before and declares no more is removed. A schedule of the
    same name added by hand is taken over by the template. Return the counts per change.
    """
    counts = {"added": 0, "updated": 0, "unchanged": 0, "removed": 0}
    for declaration in template.schedules:
        _, change = save_schedule(conn, declaration, template, now=now, declared_in=template.name)
        counts[change] += 1
    wanted = {declaration.name for declaration in template.schedules}
    for name in declared_names(conn, template.name):
        if name not in wanted:
            delete_schedule(conn, name)
            counts["removed"] += 1
    return counts
