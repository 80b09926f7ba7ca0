"""The dashboard's task list shows flow control over real HTTP: the busiest concurrency keys
(running, held, limit) and every rate limit with its tokens now, as ``duplex status`` does.

Served in-process over a SQLite database; the claim that holds steps back is the real one.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from duplex.clock import utcnow
from duplex.flow.rates import parse_rate
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.rate_limits import set_limit
from duplex.storage.submission import create_tasks
from duplex.templates import parse_template
from tests.conftest import make_settings, sqlite_database
from tests.dashboard.support import Browser, serving

KEYED = parse_template(
    'name = "sync"\n[[steps]]\nname = "s"\nhandler = "t.s"\n'
    'concurrency = { key = "context.customer", limit = 2 }\n'
)
ROW = re.compile(r'<tr data-(key|limit)="([^"]*)">(.*?)</tr>', re.S)
CELL = re.compile(r"<td[^>]*>(.*?)</td>", re.S)


def flow_rows(body: str) -> dict[tuple[str, str], list[str]]:
    return {
        (kind, html.unescape(name)): [html.unescape(c) for c in CELL.findall(cells)][1:]
        for kind, name, cells in ROW.findall(body)
    }


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Database, int]]:
    db = sqlite_database(tmp_path / "flow.db")
    try:
        with serving(make_settings(str(db.url)), db) as port:
            yield db, port
    finally:
        db.dispose()


def test_the_task_list_shows_keys_and_rate_limits(site: tuple[Database, int]) -> None:
    db, port = site
    browser = Browser(port)
    page = browser.get("/tasks")
    assert 'id="flow-control"' not in page.body  # nothing to show: no section
    now = utcnow()
    with db.write() as conn:
        set_limit(conn, "crm <api>", parse_rate("20/s", burst=3), now=now, operator="test")
        create_tasks(conn, KEYED, [{"customer": "acme"}] * 5, now=now)
        claimed = claim_ready_steps(
            conn, worker_id="w1", namespaces=("default",), limit=10, now=now
        )
    assert len(claimed) == 2  # and three held
    shown = flow_rows(browser.get("/tasks").body)
    assert shown[("key", "context.customer=acme")] == ["2", "3", "2"]
    assert shown[("limit", "crm <api>")] == ["20/s", "3", "4.0"]
