"""The dashboard's schedules page: each schedule, its next fire, and its last fires with
their tasks (docs/time.md, Schedules)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from duplex.schedules.spec import format_duration
from duplex.storage.schedules import Schedule, ScheduleFire, list_schedules, recent_fires

# The fires each schedule shows.
LAST_FIRES = 5


@dataclass(frozen=True)
class ScheduleRow:
    """One schedule as the page shows it."""

    schedule: Schedule
    when: str  # "cron 30 2 * * * (Europe/Berlin)" or "every 15m"
    catchup: str
    next_in_s: float  # negative: due (a firer will act on it at its next poll)
    fires: list[ScheduleFire]


def schedules_view(conn: Connection, *, now: datetime) -> list[ScheduleRow]:
    schedules = list_schedules(conn)
    fires = recent_fires(conn, [s.name for s in schedules], per_schedule=LAST_FIRES)
    return [
        ScheduleRow(
            schedule=s,
            when=s.spec.describe(),
            catchup=format_duration(s.catchup),
            next_in_s=(s.next_fire_at - now).total_seconds(),
            fires=fires.get(s.name, []),
        )
        for s in schedules
    ]
