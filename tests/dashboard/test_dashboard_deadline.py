"""The task page shows a task's deadline (``max_duration``), and says when it was exceeded."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

from duplex.clock import utcnow
from duplex.storage.deadlines import expire_tasks
from duplex.storage.submission import create_task
from duplex.templates import parse_template
from tests.conftest import make_settings, sqlite_database
from tests.dashboard.support import Browser, serving

FACT = re.compile(r"<dt>([^<]+)</dt><dd[^>]*>(.*?)</dd>", re.S)
TEMPLATE = 'name = "dl"\nmax_duration = "15m"\n[[steps]]\nname = "a"\nhandler = "t.h"\n'


def facts(body: str) -> dict[str, str]:
    return {label: re.sub(r"<[^>]+>", "", value).strip() for label, value in FACT.findall(body)}


def test_the_task_page_shows_the_deadline_and_whether_it_passed(tmp_path: Path) -> None:
    db = sqlite_database(tmp_path / "d.db")
    try:
        now = utcnow()
        with db.write() as conn:
            open_task = create_task(conn, parse_template(TEMPLATE), {}, now=now)
            late = create_task(conn, parse_template(TEMPLATE), {}, now=now - timedelta(hours=1))
            plain = create_task(
                conn, parse_template(TEMPLATE.replace('max_duration = "15m"\n', "")), {}, now=now
            )
        with db.write() as conn:
            expire_tasks(conn, [late], now=now, worker_id="w")
        with serving(make_settings(str(db.url)), db) as port:
            browser = Browser(port)
            shown = {t: facts(browser.get(f"/tasks/{t}").body) for t in (open_task, late, plain)}
    finally:
        db.dispose()
    assert shown[open_task]["Deadline"].endswith(" UTC")
    assert "task_deadline_exceeded" not in shown[open_task]["Deadline"]
    assert shown[late]["Deadline"].endswith("task_deadline_exceeded")
    assert shown[late]["Cancelled"].endswith(" UTC")
    assert "Deadline" not in shown[plain]
