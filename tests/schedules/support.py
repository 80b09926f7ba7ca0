"""Schedule test tools: a one-step template, a fake clock, and reading what firing wrote."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st
from sqlalchemy import select, update

from duplex.schedules.declaration import declare
from duplex.storage.db import Database
from duplex.storage.models import domain_events, schedule_fires, tasks
from duplex.storage.schedule_firing import FireReport, fire_due
from duplex.storage.schedules import Schedule, save_schedule
from duplex.templates import TaskTemplate, parse_template

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)

# The racing firers' examples: random schedules, and random clock jumps.
SPECS = st.sampled_from(
    [
        {"every": "1s"},
        {"every": "2s"},
        {"every": "500ms"},
        {"every": "7s"},
        {"cron": "*/3 * * * * *"},
        {"cron": "* * * * *"},
    ]
)
SCHEDULES = st.lists(
    st.tuples(
        SPECS,
        st.sampled_from(["skip", "buffer_one", "allow"]),
        st.sampled_from(["2s", "10s", "1m"]),
    ),
    min_size=1,
    max_size=4,
)
# Each round: how far the shared clock jumps (backwards now and then, far now and then), and
# each firer's own skew from it.
ROUNDS = st.lists(
    st.tuples(
        st.integers(min_value=-3000, max_value=90_000),
        st.lists(st.integers(min_value=-500, max_value=500), min_size=4, max_size=4),
    ),
    min_size=1,
    max_size=6,
)


TEMPLATE_TOML = """
name = "tick"
[[steps]]
name = "work"
handler = "t.work"
"""
TEMPLATE: TaskTemplate = parse_template(TEMPLATE_TOML)


def add(
    db: Database,
    name: str,
    *,
    now: datetime = T0,
    template: TaskTemplate = TEMPLATE,
    spec: dict[str, str] | None = None,
    **kw: Any,
) -> Schedule:
    """Add a schedule as ``duplex schedule add`` does, at ``now`` (``spec``: its cron or
    every; 10 s by default)."""
    kw.update(spec or {})
    if "cron" not in kw:
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
        return [tuple(row) for row in rows]


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


def wipe(db: Database) -> None:
    """Empty every table firing writes, so one migrated database serves many examples."""
    from sqlalchemy import delete

    from duplex.storage.models import (
        schedules,
        workflow_step_edges,
        workflow_step_transitions,
        workflow_steps,
    )

    with db.write() as conn:
        for table in (
            schedule_fires,
            schedules,
            domain_events,
            workflow_step_transitions,
            workflow_step_edges,
            workflow_steps,
            tasks,
        ):
            conn.execute(delete(table))


def check_exactly_once(db: Database) -> None:
    """What any set of racing firers must leave: one task per fire time, one record per fire
    time, and every fire time of each schedule accounted for, in order, none twice."""
    from duplex.storage.schedules import list_schedules

    keys = fired_keys(db)
    twice = {key: n for key, n in keys.items() if n != 1}
    assert not twice, f"fire times with more than one task: {twice}"
    with db.read() as conn:
        all_schedules = list_schedules(conn)
    total_fired = 0
    for schedule in all_schedules:
        rows = fire_rows(db, schedule.name)
        fired = [task for outcome, _, _, task in rows if outcome == "fired"]
        total_fired += len(fired)
        assert None not in fired
        # Walk the schedule's fire times from its first record: each is recorded exactly
        # once (a missed row stands for ``fires`` of them), or still held back by buffer_one.
        recorded = sorted(rows, key=lambda row: row[1])
        held = schedule.buffered_fire_at
        if not recorded and held is None:
            continue
        first = min([row[1] for row in recorded] + ([held] if held else []))
        expected = schedule.spec.fires_after(first - timedelta(microseconds=1))
        marks = [(at, fires, outcome) for outcome, at, fires, _ in recorded]
        if held is not None:
            marks.append((held, 1, "held"))
        marks.sort()
        for at, fires, outcome in marks:
            moment = next(expected)
            assert moment == at, f"{schedule.name}: expected {moment}, found {outcome} {at}"
            for _ in range(fires - 1):  # the rest of a missed range
                next(expected)
        assert next(expected) == schedule.next_fire_at, f"{schedule.name}: a fire time was lost"
    assert total_fired == sum(keys.values())


class FirerProcess:
    """A ``tests.schedules.firer_process`` subprocess, owned by the running test."""

    def __init__(self, url: str) -> None:
        import os
        import subprocess
        import sys
        from pathlib import Path

        from tests import processes

        root = Path(__file__).resolve().parents[2]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEX_")}
        env.update(PYTHONPATH=str(root), PYTHONUNBUFFERED="1")
        self.process = processes.current().popen(
            [sys.executable, "-m", "tests.schedules.firer_process", url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=root,
        )
        assert self.read() == "READY"

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def read(self) -> str:
        assert self.process.stdout is not None
        return str(self.process.stdout.readline()).strip()
