"""Firing in SQL, on SQLite and PostgreSQL: tasks, fire rows, events, policies, management."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from duplex.errors import InputError
from duplex.schedules.declaration import declare
from duplex.storage.db import Database
from duplex.storage.models import tasks
from duplex.storage.schedules import (
    declared_names,
    delete_schedule,
    get_schedule,
    set_paused,
    sync_declared,
)
from duplex.templates import parse_template
from tests.schedules.support import (
    T0,
    TEMPLATE_TOML,
    add,
    finish_task,
    fire,
    fire_all,
    fire_rows,
    fired_events,
    fired_keys,
    seconds,
)


def test_each_fire_time_creates_one_task_with_its_key_its_row_and_its_event(db: Database) -> None:
    schedule = add(db, "tick", overlap="allow", context={"n": 1})
    assert schedule.next_fire_at == T0 + seconds(10)
    assert not fire(db, T0 + seconds(9)).acted
    report = fire(db, T0 + seconds(10))
    assert [f.fire_at for f in report.fired] == [T0 + seconds(10)]
    fire_all(db, T0 + seconds(35))
    assert fired_keys(db) == {
        "schedule:tick@2026-12-04T12:00:10Z": 1,
        "schedule:tick@2026-12-04T12:00:20Z": 1,
        "schedule:tick@2026-12-04T12:00:30Z": 1,
    }
    rows = fire_rows(db, "tick")
    assert [(outcome, at) for outcome, at, _, _ in rows] == [
        ("fired", T0 + seconds(s)) for s in (10, 20, 30)
    ]
    events = fired_events(db)
    assert [e["fire_at"] for e in events] == [
        "2026-12-04T12:00:10Z",
        "2026-12-04T12:00:20Z",
        "2026-12-04T12:00:30Z",
    ]
    assert all(e["_sequence"] == 1 and e["schedule"] == "tick" for e in events)
    assert [e["_task"] for e in events] == [task for _, _, _, task in rows]
    with db.read() as conn:
        after = get_schedule(conn, "tick")
    assert after is not None
    assert after.next_fire_at == T0 + seconds(40)
    assert after.last_fire_at == T0 + seconds(30)
    assert after.last_task_uuid == rows[-1][3]


def test_skip_records_fires_while_the_previous_task_runs(db: Database) -> None:
    add(db, "s", overlap="skip")
    first = fire(db, T0 + seconds(10)).fired[0]
    fire_all(db, T0 + seconds(30))
    finish_task(db, first.task_uuid)
    fire_all(db, T0 + seconds(40))
    assert [(o, at) for o, at, _, _ in fire_rows(db, "s")] == [
        ("fired", T0 + seconds(10)),
        ("skipped", T0 + seconds(20)),
        ("skipped", T0 + seconds(30)),
        ("fired", T0 + seconds(40)),
    ]


@pytest.mark.parametrize("ended", ["complete", "error", "cancelled"])
def test_buffer_one_fires_the_held_fire_when_the_previous_task_ends(
    db: Database, ended: str
) -> None:
    add(db, "b", overlap="buffer_one")
    first = fire(db, T0 + seconds(10)).fired[0]
    fire_all(db, T0 + seconds(30))  # 20 held back, 30 skipped
    with db.read() as conn:
        held = get_schedule(conn, "b")
    assert held is not None
    assert held.buffered_fire_at == T0 + seconds(20)
    assert not fire(db, T0 + seconds(31)).acted  # still running: nothing to do
    finish_task(db, first.task_uuid, ended)
    report = fire(db, T0 + seconds(32))
    assert [f.fire_at for f in report.fired] == [T0 + seconds(20)]
    assert [(o, at) for o, at, _, _ in fire_rows(db, "b")] == [
        ("fired", T0 + seconds(10)),
        ("fired", T0 + seconds(20)),
        ("skipped", T0 + seconds(30)),
    ]
    assert fired_keys(db)["schedule:b@2026-12-04T12:00:20Z"] == 1


def test_fires_beyond_the_catch_up_window_are_one_missed_row(db: Database) -> None:
    add(db, "m", overlap="allow", catchup="30s")
    fire_all(db, T0 + seconds(100))
    rows = fire_rows(db, "m")
    assert rows[0][:3] == ("missed", T0 + seconds(10), 6)  # 10..60
    assert [(o, at) for o, at, _, _ in rows[1:]] == [
        ("fired", T0 + seconds(s)) for s in (70, 80, 90, 100)
    ]


def test_a_paused_schedule_does_not_fire_and_resumes_after_now(db: Database) -> None:
    add(db, "p")
    with db.write() as conn:
        set_paused(conn, "p", True, now=T0)
    assert not fire_all(db, T0 + seconds(3600))
    with db.write() as conn:
        resumed = set_paused(conn, "p", False, now=T0 + seconds(3605))
    assert resumed is not None
    assert resumed.next_fire_at == T0 + seconds(3610)
    fire_all(db, T0 + seconds(3610))
    assert [(o, at) for o, at, _, _ in fire_rows(db, "p")] == [("fired", T0 + seconds(3610))]


def test_a_schedule_added_again_under_its_name_does_not_fire_a_fire_time_twice(
    db: Database,
) -> None:
    add(db, "r", overlap="allow")
    first = fire(db, T0 + seconds(10)).fired[0]
    with db.write() as conn:
        assert delete_schedule(conn, "r")
    add(db, "r", overlap="allow", now=T0)  # same fire times again
    again = fire(db, T0 + seconds(10)).fired[0]
    assert again.task_uuid == first.task_uuid
    assert fired_keys(db) == {"schedule:r@2026-12-04T12:00:10Z": 1}
    assert len(fired_events(db)) == 1


def test_declared_schedules_are_added_updated_kept_paused_and_removed(db: Database) -> None:
    v1 = parse_template(
        TEMPLATE_TOML
        + """
[[schedules]]
name = "hourly"
cron = "0 * * * *"
[[schedules]]
name = "fast"
every = "1s"
context = { kind = "fast" }
"""
    )
    with db.write() as conn:
        assert sync_declared(conn, v1, now=T0) == {
            "added": 2,
            "updated": 0,
            "unchanged": 0,
            "removed": 0,
        }
        set_paused(conn, "hourly", True, now=T0)
    v2 = parse_template(
        TEMPLATE_TOML
        + """
[[schedules]]
name = "hourly"
cron = "30 * * * *"
timezone = "Europe/Berlin"
overlap = "allow"
"""
    )
    with db.write() as conn:
        assert sync_declared(conn, v2, now=T0) == {
            "added": 0,
            "updated": 1,
            "unchanged": 0,
            "removed": 1,
        }
        hourly = get_schedule(conn, "hourly")
        assert sync_declared(conn, v2, now=T0)["unchanged"] == 1
        assert declared_names(conn, "tick") == ["hourly"]
    assert hourly is not None
    assert hourly.paused
    assert hourly.overlap == "allow"
    assert hourly.declared_in == "tick"
    assert hourly.next_fire_at == T0 + timedelta(minutes=30)


def test_a_template_with_bad_schedules_is_one_line() -> None:
    from duplex.errors import TemplateError

    with pytest.raises(TemplateError, match=r"schedules\.0: .*invalid cron expression") as info:
        parse_template(TEMPLATE_TOML + '[[schedules]]\nname = "x"\ncron = "nope"\n')
    assert "\n" not in str(info.value)
    with pytest.raises(TemplateError, match="declared twice: x"):
        parse_template(
            TEMPLATE_TOML
            + '[[schedules]]\nname = "x"\nevery = "1s"\n' * 1
            + '[[schedules]]\nname = "x"\nevery = "2s"\n'
        )
    with pytest.raises(InputError, match="overlap"):
        declare(name="x", every="1s", overlap="cancel_previous")


def test_each_fire_keeps_only_the_newest_fire_rows(db: Database) -> None:
    from duplex.storage.schedule_firing import fire_due

    add(db, "busy", every="1s", overlap="allow")
    for second in range(1, 7):
        with db.write() as conn:
            fire_due(conn, now=T0 + seconds(second), worker_id="w", keep_fires=3)
    assert [at for _, at, _, _ in fire_rows(db, "busy")] == [T0 + seconds(s) for s in (4, 5, 6)]
    assert len(fired_keys(db)) == 6  # the tasks stay


def test_a_schedule_of_a_template_with_a_deadline_fires_it_with_its_deadline(
    db: Database,
) -> None:
    # The template is stored with the schedule and read back at each fire: its
    # ``max_duration`` must read back as it was written.
    template = parse_template(
        TEMPLATE_TOML.replace('name = "tick"', 'name = "tick"\nmax_duration = "15m"')
    )
    add(db, "timed", template=template, overlap="allow")
    (report,) = fire_all(db, T0 + seconds(10))
    (fired,) = report.fired
    with db.read() as conn:
        deadline = conn.execute(
            select(tasks.c.deadline_at).where(tasks.c.task_uuid == fired.task_uuid)
        ).scalar_one()
    assert deadline == T0 + seconds(10) + timedelta(minutes=15)
