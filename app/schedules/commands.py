"""Managing schedules from a program: the ``Client``'s schedule methods (and the CLI's).

    with Client("postgresql+psycopg://app@db/duplex") as client:
        client.add_schedule("nightly", "report", cron="30 2 * * *", timezone="Europe/Berlin")
        client.pause_schedule("nightly")

Every change is one transaction; bad input is one ``InputError`` line and writes nothing.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from duplex.clock import utcnow
from duplex.errors import InputError
from duplex.messages import JSONDict
from duplex.schedules.declaration import declare
from duplex.schedules.spec import format_duration
from duplex.storage.db import Database
from duplex.storage.schedules import (
    Schedule,
    ScheduleFire,
    delete_schedule,
    get_schedule,
    list_schedules,
    recent_fires,
    save_schedule,
    set_paused,
)
from duplex.templates import TaskTemplate


class ScheduleCommands:
    """The schedule methods of ``duplex.Client`` (it provides ``db`` and ``_template``)."""

    db: Database

    def _template(self, template: TaskTemplate | str | Path) -> TaskTemplate:
        raise NotImplementedError  # provided by Client

    def add_schedule(
        self,
        name: str,
        template: TaskTemplate | str | Path,
        *,
        cron: str | None = None,
        every: timedelta | str | None = None,
        context: JSONDict | None = None,
        timezone: str = "UTC",
        overlap: str = "skip",
        catchup: timedelta | str | None = None,
        paused: bool = False,
        replace: bool = False,
    ) -> Schedule:
        """Add a schedule firing ``template`` on ``cron`` (in ``timezone``) or ``every``
        interval; ``replace`` updates one of that name instead of refusing it."""
        declaration = declare(
            name=name,
            cron=cron,
            every=_duration_text(every),
            context=context if context is not None else {},
            timezone=timezone,
            overlap=overlap,
            catchup=_duration_text(catchup),
            paused=paused,
        )
        resolved = self._template(template)
        with self.db.write() as conn:
            existing = get_schedule(conn, name, lock=True)
            if existing is not None and not replace:
                raise InputError(
                    f"schedule {name!r} already exists (remove it first, or replace it: --replace)"
                )
            schedule, _ = save_schedule(conn, declaration, resolved, now=utcnow())
        return schedule

    def schedules(self) -> list[Schedule]:
        """Every schedule, by name."""
        with self.db.read() as conn:
            return list_schedules(conn)

    def schedule(self, name: str) -> Schedule:
        """The schedule ``name``; ``InputError`` when there is none."""
        with self.db.read() as conn:
            return _found(name, get_schedule(conn, name))

    def schedule_fires(self, name: str, *, limit: int = 20) -> list[ScheduleFire]:
        """The last ``limit`` fire records of schedule ``name``, newest first."""
        with self.db.read() as conn:
            _found(name, get_schedule(conn, name))
            return recent_fires(conn, [name], per_schedule=limit)[name]

    def pause_schedule(self, name: str) -> Schedule:
        """Stop firing ``name`` until resumed (a held-back fire is dropped)."""
        return self._set_paused(name, True)

    def resume_schedule(self, name: str) -> Schedule:
        """Fire ``name`` again, from its first fire time after now."""
        return self._set_paused(name, False)

    def remove_schedule(self, name: str) -> None:
        """Remove ``name`` and its fire history (its tasks stay)."""
        with self.db.write() as conn:
            if not delete_schedule(conn, name):
                raise InputError(f"no such schedule: {name!r}")

    def _set_paused(self, name: str, paused: bool) -> Schedule:
        with self.db.write() as conn:
            return _found(name, set_paused(conn, name, paused, now=utcnow()))


def _found(name: str, schedule: Schedule | None) -> Schedule:
    if schedule is None:
        raise InputError(f"no such schedule: {name!r}")
    return schedule


def _duration_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, timedelta):
        if value <= timedelta(0) or value % timedelta(milliseconds=1):
            raise InputError(f"a duration must be a positive whole number of ms: {value}")
        return format_duration(value)
    raise InputError(f"not a duration: {value!r}")
