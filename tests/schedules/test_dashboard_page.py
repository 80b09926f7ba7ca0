"""The dashboard's schedules page: next fire, last fires linking their tasks, paused."""

from __future__ import annotations

import html

from duplex.storage.db import Database
from duplex.storage.schedules import set_paused
from tests.conftest import make_settings
from tests.dashboard.support import Browser, serving
from tests.schedules.support import T0, add, fire_all, seconds


def test_the_schedules_page_lists_next_fire_last_fires_and_paused(sqlite_db: Database) -> None:
    add(sqlite_db, "often", overlap="allow", catchup="15s")
    add(sqlite_db, "nightly", cron="30 2 * * *", timezone="Europe/Berlin")
    reports = fire_all(sqlite_db, T0 + seconds(40))
    task_uuids = [fired.task_uuid for report in reports for fired in report.fired]
    with sqlite_db.write() as conn:
        set_paused(conn, "nightly", True, now=T0)
    with serving(make_settings(str(sqlite_db.url)), sqlite_db) as port:
        browser = Browser(port)
        reply = browser.get("/schedules")
    assert reply.status == 200
    body = html.unescape(reply.body)
    assert 'href="/schedules" aria-current="page"' in body
    often = body[body.index('data-schedule="often"') :]
    assert "every 10s" in often
    assert "2026-12-04 12:00:50.000" in often  # the next fire
    for task_uuid in task_uuids:
        assert f'href="/tasks/{task_uuid}"' in often
    assert 'data-outcome="missed"' in often
    assert "missed x2" in often  # 10 s and 20 s, more than 15 s late at 40 s
    nightly = body[body.index('data-schedule="nightly"') : body.index('data-schedule="often"')]
    assert "cron 30 2 * * * (Europe/Berlin)" in nightly
    assert "paused" in nightly


def test_no_schedules_says_how_to_add_one(sqlite_db: Database) -> None:
    with serving(make_settings(str(sqlite_db.url)), sqlite_db) as port:
        reply = Browser(port).get("/schedules")
    assert reply.status == 200
    assert "duplex schedule add" in reply.body
