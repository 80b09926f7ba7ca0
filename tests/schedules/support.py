"""Schedule test tools: a one-step template, a fake clock, and reading what firing wrote."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from duplex.schedules.declaration import declare
from duplex.storage.db import Database
from duplex.storage.models import domain_events, schedule_fires, tasks
from duplex.storage.schedule_firing import FireReport, fire_due
from duplex.storage.schedules import Schedule, save_schedule
from duplex.templates import TaskTemplate, parse_template

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)

TEMPLATE_TOML = """
name = "tick"
[[steps]]
name = "work"
handler = "t.work"
"""
TEMPLATE: TaskTemplate = parse_template(TEMPLATE_TOML)


def add(
    db: Database, name: str, *, now: datetime = T0, template: TaskTemplate = TEMPLATE, **kw: Any
) -> Schedule:
    """Add a schedule as ``duplex schedule add`` does, at ``now``."""
    kw.setdefault("every", "10s")
    with db.write() as conn:
        schedule, _ = save_schedule(conn, declare(name=name, **kw), template, now=now)
    return schedule


def fire(db: Database, now: datetime, *, worker_id: str = "w", limit: int = 100) -> FireReport:
    with db.write() as conn:
        return fire_due(conn, now=now, worker_id=worker_id, limit=limit)


def fire_all(db: Database, now: datetime, *, worker_id: str = "w") -> list[FireReport]:
    """Fire until nothing more is due at ``now`` (as the poller's round does)."""
    reports = []
    while (report := fire(db, now, worker_id=worker_id)).acted:
        reports.append(report)
    return reports


def fired_keys(db: Database) -> Counter[str]:
    """How many tasks carry each ``schedule:`` idempotency key (each must be 1)."""
    with db.read() as conn:
        keys = conn.execute(
            select(tasks.c.idempotency_key).where(tasks.c.idempotency_key.like("schedule:%"))
        ).scalars()
        return Counter(keys)


def fire_rows(db: Database, name: str) -> list[tuple[str, datetime, int, str | None]]:
    with db.read() as conn:
        rows = conn.execute(
            select(
                schedule_fires.c.outcome,
                schedule_fires.c.fire_at,
                schedule_fires.c.fires,
                schedule_fires.c.task_uuid,
            )
            .where(schedule_fires.c.schedule_name == name)
            .order_by(schedule_fires.c.fire_at)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


def fired_events(db: Database) -> list[dict[str, Any]]:
    with db.read() as conn:
        rows = conn.execute(
            select(domain_events.c.payload, domain_events.c.sequence, domain_events.c.task_uuid)
            .where(domain_events.c.name == "schedule.fired")
            .order_by(domain_events.c.created_at)
        )
        return [{**row.payload, "_sequence": row.sequence, "_task": row.task_uuid} for row in rows]


def finish_task(db: Database, task_uuid: str, state: str = "complete") -> None:
    """End a task by hand (its run is over for the overlap policies)."""
    with db.write() as conn:
        conn.execute(update(tasks).where(tasks.c.task_uuid == task_uuid).values(state=state))


def seconds(n: float) -> timedelta:
    return timedelta(seconds=n)
