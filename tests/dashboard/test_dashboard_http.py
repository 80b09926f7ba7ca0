"""The dashboard over real HTTP: every page, bad input, operator actions, login, and a database
that goes away and comes back.

Most tests serve ``Dashboard(settings, db)`` in-process with ``HttpServer`` on a free port and
talk to it with ``http.client`` (no redirect is followed, cookies are kept by hand: ``serving``
and ``Browser`` of ``tests/dashboard/support.py``). The data is real: tasks are submitted with
``Client`` and run by an embedded ``Worker`` (complete steps, a retried step, a step in error
with its traceback), or moved step by step with the storage functions the actors use. Where the
process matters (refusing to bind off-loopback without a token, not logging task data, surviving
a database outage) a real ``duplex dashboard`` subprocess is started; the outage is made for
real on PostgreSQL by a TCP proxy written here.
"""

from __future__ import annotations

import html
import json
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from duplex import Client
from duplex.clock import utcnow
from duplex.commit.retry import RetryPolicy
from duplex.errors import StepError, TransitionError
from duplex.handlers import HandlerRegistry, StepContext
from duplex.messages import ClaimedStep, StepFailure, StepOutcome
from duplex.settings import DatabaseSettings
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.migrate import upgrade_to_head
from duplex.storage.models import tasks, workers, workflow_step_transitions, workflow_steps
from duplex.storage.operations import OperatorReport, cancel_task, resolve_step, retry_step
from duplex.storage.results import commit_outcomes
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import parse_template
from duplex.worker.wiring import Worker
from tests.cli.support import Duplex, assert_one_line_error, make_duplex
from tests.conftest import make_settings, open_work, sqlite_database, wait_until
from tests.dashboard.support import Browser, Reply, serving

TOKEN = "correct-horse-battery-staple"
SERVING = re.compile(r"serving http://([\d.]+):(\d+)/ \(dashboard\)")
NO_TRACEBACK = "Traceback"

SHOP = """
name = "shop"
[[steps]]
name = "reserve"
handler = "t.echo"
[[steps]]
name = "charge"
handler = "t.flaky"
depends_on = ["reserve"]
max_attempts = 3
[[steps]]
name = "ship"
handler = "t.echo"
depends_on = ["charge"]
"""

BROKEN = """
name = "broken"
[[steps]]
name = "explode"
handler = "t.boom"
max_attempts = 1
[[steps]]
name = "after"
handler = "t.echo"
depends_on = ["explode"]
"""

# In a namespace no worker serves: it stays ready.
PARKED = """
name = "parked"
namespace = "elsewhere"
[[steps]]
name = "wait"
handler = "t.echo"
"""

# For the operator actions: a -> b -> c, b allowed one attempt; and a task of one step.
OPS = """
name = "ops"
namespace = "manual"
[[steps]]
name = "a"
handler = "t.h"
[[steps]]
name = "b"
handler = "t.h"
depends_on = ["a"]
max_attempts = 1
[[steps]]
name = "c"
handler = "t.h"
depends_on = ["b"]
"""

SINGLE = """
name = "single"
namespace = "manual"
[[steps]]
name = "only"
handler = "t.h"
"""


def assert_error_page(reply: Reply, status: int, *fragments: str) -> str:
    """A clear error page: the status, one line naming the problem, never a traceback."""
    assert reply.status == status, f"{reply.status} != {status}:\n{reply.body}"
    assert NO_TRACEBACK not in reply.body, reply.body
    assert reply.header("Content-Type").startswith("text/html"), reply.headers
    assert "<html" in reply.body
    message = reply.message
    assert message.strip(), repr(message)
    assert "\n" not in message, repr(message)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_security_headers(reply: Reply) -> None:
    csp = reply.header("Content-Security-Policy")
    assert "default-src 'none'" in csp, csp
    assert "script-src 'self'" in csp, csp
    assert "frame-ancestors 'none'" in csp, csp
    assert reply.header("X-Frame-Options") == "DENY"
    assert reply.header("X-Content-Type-Options") == "nosniff"


def task_rows(reply: Reply) -> list[str]:
    return re.findall(r'<tr data-task="([0-9a-f-]{36})">', reply.body)


def status_counts(reply: Reply) -> dict[str, int]:
    found = re.findall(r'data-status="(\w+)"[^>]*><span class="n">(\d+)</span>', reply.body)
    return {status: int(count) for status, count in found}


def pager_link(reply: Reply, rel: str) -> str | None:
    found = re.findall(rf'<a rel="{rel}" href="([^"]+)"', reply.body)
    return html.unescape(found[0]) if found else None


def all_task_rows(browser: Browser, path: str) -> list[str]:
    """Every task of a filtered list, following "Older" links to the last page."""
    seen: list[str] = []
    next_path: str | None = path
    while next_path is not None:
        reply = browser.get(next_path)
        assert reply.status == 200, reply.body
        seen += task_rows(reply)
        next_path = pager_link(reply, "next")
        assert len(seen) < 100, "the pager does not end"
    return seen


# --- a database with real history, made by a real worker -------------------------------------


@dataclass
class History:
    port: int
    db: Database
    worker_id: str
    shop: list[str]  # newest last
    broken: str
    parked: str
    markers: dict[str, str]  # task uuid -> the marker in its context
    steps: dict[tuple[str, str], str] = field(default_factory=dict)  # (task, step) -> uuid

    @property
    def every_task(self) -> list[str]:
        return [*self.shop, self.broken, self.parked]


class FlakyError(StepError):
    error_type = "card_declined"
    retryable = True


def _handlers() -> HandlerRegistry:
    registry = HandlerRegistry()

    def echo(ctx: StepContext) -> dict[str, Any]:
        ctx.emit("shop.step_done", {"step": ctx.step_name})
        return {"step": ctx.step_name, "parents": sorted(ctx.dependency_results)}

    def flaky(ctx: StepContext) -> dict[str, Any]:
        if ctx.attempt == 1:
            raise FlakyError("card declined, try again")
        return {"charged": True, "attempt": ctx.attempt}

    def boom(ctx: StepContext) -> dict[str, Any]:
        raise ValueError("the widget is missing")

    registry.register("t.echo", echo)
    registry.register("t.flaky", flaky)
    registry.register("t.boom", boom)
    return registry


def _step_uuids(db: Database) -> dict[tuple[str, str], str]:
    with db.read() as conn:
        rows = conn.execute(
            select(workflow_steps.c.task_uuid, workflow_steps.c.name, workflow_steps.c.step_uuid)
        )
        return {(t, n): s for t, n, s in rows}


def _has_beaten(db: Database, worker_id: str) -> bool:
    """The worker's first heartbeat wrote its stats (it registers with none)."""
    with db.read() as conn:
        stats = conn.execute(
            select(workers.c.stats).where(workers.c.worker_id == worker_id)
        ).scalar_one_or_none()
    return bool(stats)


def _state(db: Database, step_uuid: str) -> str:
    with db.read() as conn:
        return str(
            conn.execute(
                select(workflow_steps.c.state).where(workflow_steps.c.step_uuid == step_uuid)
            ).scalar_one()
        )


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    """Three shop tasks (complete; their charge step retried once), one broken task (a step in
    error with a traceback, its child never run) and one parked task (ready, in a namespace no
    worker serves); the worker stays up so that /workers shows it alive."""
    db = sqlite_database(tmp_path_factory.mktemp("history") / "history.db")
    settings = make_settings(
        str(db.url),
        worker={"max_concurrent_handlers": 4, "heartbeat_interval_s": 0.5},
        event_system={"polling_interval_ms": 20},
        retry={"backoff_base_ms": 0, "jitter": 0.0},
        dashboard={"page_size": 2, "refresh_ms": 500},
    )
    client = Client(db)
    markers: dict[str, str] = {}
    shop = []
    for n in range(3):
        marker = f"marker-{uuid.uuid4().hex}"
        task = client.submit(parse_template(SHOP), {"order": n, "note": marker})
        markers[task] = marker
        shop.append(task)
    broken = client.submit(parse_template(BROKEN), {"order": "broken"})
    parked = client.submit(parse_template(PARKED), {"order": "parked"})
    steps = _step_uuids(db)
    worker = Worker(settings, db, registry=_handlers(), subscribers=SubscriberRegistry())
    worker.start()
    try:
        explode = steps[(broken, "explode")]
        assert wait_until(lambda: open_work(db) == 0 and _state(db, explode) == "error", 20)
        with db.read() as conn:
            (worker_id,) = conn.execute(
                select(workflow_step_transitions.c.worker_id)
                .where(workflow_step_transitions.c.to_state == "in_progress")
                .limit(1)
            ).one()
        # The work can drain before the first heartbeat (0.5 s) writes the slots /workers shows.
        assert wait_until(lambda: _has_beaten(db, str(worker_id)), 10)
        with serving(settings, db) as port:
            yield History(port, db, str(worker_id), shop, broken, parked, markers, steps)
    finally:
        worker.stop()
        db.dispose()


@pytest.fixture
def browser(history: History) -> Browser:
    return Browser(history.port)


# --- 1. every page, on real data ----------------------------------------------------------


def test_home_redirects_to_the_task_list(browser: Browser) -> None:
    reply = browser.get("/")
    assert reply.status == 303
    assert reply.header("Location") == "/tasks"


def test_task_list_is_newest_first_with_counts_per_status(
    browser: Browser, history: History
) -> None:
    reply = browser.get("/tasks")
    assert reply.status == 200
    assert reply.header("Content-Type") == "text/html; charset=utf-8"
    assert_security_headers(reply)
    assert "<h1>Tasks</h1>" in reply.body
    # page_size = 2: the two newest, newest first.
    assert task_rows(reply) == [history.parked, history.broken]
    assert status_counts(reply) == {
        "blocked_by_failures": 1,
        "has_ready_steps": 1,
        "processing": 0,
        "scheduled": 0,
        "all_complete": 3,
        "waiting_for_dependencies": 0,
        "cancelled": 0,
    }
    # The csrf cookie is set on the first visit, HttpOnly and SameSite=Strict.
    (line,) = [c for c in reply.headers.get_all("Set-Cookie") or [] if "duplex_csrf=" in c]
    assert "HttpOnly" in line
    assert "SameSite=Strict" in line
    # Every task is reachable through the pager, each once, newest first.
    assert all_task_rows(browser, "/tasks") == list(reversed(history.every_task))


def test_pagination_older_and_newer(browser: Browser, history: History) -> None:
    newest_first = list(reversed(history.every_task))
    first = browser.get("/tasks")
    assert pager_link(first, "prev") is None
    older = pager_link(first, "next")
    assert older is not None
    assert "before=" in older
    second = browser.get(older)
    assert task_rows(second) == newest_first[2:4]
    newer = pager_link(second, "prev")
    assert newer is not None
    assert "after=" in newer
    assert task_rows(browser.get(newer)) == newest_first[0:2]
    third = browser.get(pager_link(second, "next") or "")
    assert task_rows(third) == newest_first[4:]
    assert pager_link(third, "next") is None
    back = browser.get(pager_link(third, "prev") or "")
    assert task_rows(back) == newest_first[2:4]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("state=complete", "shop"),
        ("state=error", "broken"),
        ("state=pending", "parked"),
        ("state=cancelled", "none"),
        ("status=all_complete", "shop"),
        ("status=blocked_by_failures", "broken"),
        ("status=has_ready_steps", "parked"),
        ("status=processing", "none"),
        ("name=shop", "shop"),
        ("name=broken", "broken"),
        ("name=no-such-template", "none"),
        ("namespace=elsewhere", "parked"),
        ("namespace=default", "default"),
        ("namespace=nowhere", "none"),
        ("since=2000-01-01T00:00&until=2999-01-01T00:00", "all"),
        ("since=2999-01-01T00:00", "none"),
        ("until=2000-01-01T00:00", "none"),
        ("name=shop&state=complete&status=all_complete&namespace=default", "shop"),
    ],
)
def test_task_list_filters(browser: Browser, history: History, query: str, expected: str) -> None:
    groups = {
        "shop": history.shop,
        "broken": [history.broken],
        "parked": [history.parked],
        "default": [*history.shop, history.broken],
        "all": history.every_task,
        "none": [],
    }
    want = list(reversed(groups[expected]))
    assert all_task_rows(browser, f"/tasks?{query}") == want
    if not want:
        assert "No tasks match." in browser.get(f"/tasks?{query}").body


def test_status_counts_follow_the_other_filters(browser: Browser) -> None:
    counts = status_counts(browser.get("/tasks?name=shop"))
    assert counts["all_complete"] == 3
    assert sum(counts.values()) == 3
    # The status filter narrows the list, not the counts (they show the alternatives).
    counts = status_counts(browser.get("/tasks?status=processing&namespace=default"))
    assert counts == {
        "blocked_by_failures": 1,
        "has_ready_steps": 0,
        "processing": 0,
        "scheduled": 0,
        "all_complete": 3,
        "waiting_for_dependencies": 0,
        "cancelled": 0,
    }


def test_task_page_shows_dag_timeline_context_and_events(
    browser: Browser, history: History
) -> None:
    task = history.shop[0]
    reply = browser.get(f"/tasks/{task}")
    assert reply.status == 200
    assert_security_headers(reply)
    body = reply.body
    assert "<title>Task shop · Duplex</title>" in body
    assert task in body
    # The DAG: one node per step, each coloured by its state.
    nodes = re.findall(r'<g class="node state-(\w+)" data-step="([0-9a-f-]{36})"', body)
    assert sorted(s for _, s in nodes) == sorted(
        history.steps[(task, n)] for n in ("reserve", "charge", "ship")
    )
    assert {state for state, _ in nodes} == {"complete"}
    assert len(re.findall(r'<g class="edges">(.*?)</g>', body, re.S)[0].split("<path")) == 3
    # The timeline: charge has two attempts (the retry), the others one.
    lanes = dict(
        re.findall(
            r'href="/steps/([0-9a-f-]{36})">[^<]*</a><svg class="lane-bars"'
            r"[^>]*>(.*?)</svg>",
            body,
        )
    )
    charge = history.steps[(task, "charge")]
    assert re.findall(r'class="bar outcome-(\w+)" data-attempt="(\d)"', lanes[charge]) == [
        ("waiting_for_retry", "1"),
        ("complete", "2"),
    ]
    assert len(re.findall(r"data-attempt=", lanes[history.steps[(task, "ship")]])) == 1
    # The context (escaped, pretty JSON) and the domain events in sequence order.
    assert history.markers[task] in body
    assert "&#34;note&#34;" in body or "&quot;note&quot;" in body
    sequences = [int(s) for s in re.findall(r'<td class="num">(\d+)</td>\s*<td>[\w.]+</td>', body)]
    assert sequences
    assert sequences == sorted(sequences)
    assert "shop.step_done" in body
    assert "step.completed" in body
    # A complete task offers no cancel button.
    assert f'action="/tasks/{task}/cancel"' not in body


def test_task_page_of_a_blocked_task_offers_cancel(browser: Browser, history: History) -> None:
    reply = browser.get(f"/tasks/{history.broken}")
    assert reply.status == 200
    nodes = dict(re.findall(r'data-step="([0-9a-f-]{36})" data-state="(\w+)"', reply.body))
    assert nodes == {
        history.steps[(history.broken, "explode")]: "error",
        history.steps[(history.broken, "after")]: "pending",
    }
    assert f'action="/tasks/{history.broken}/cancel"' in reply.body
    assert 'name="operator"' in reply.body
    assert reply.csrf


def test_step_page_of_a_retried_step_shows_each_attempt(browser: Browser, history: History) -> None:
    step = history.steps[(history.shop[1], "charge")]
    reply = browser.get(f"/steps/{step}")
    assert reply.status == 200
    assert_security_headers(reply)
    assert "<title>Step charge · Duplex</title>" in reply.body
    attempts = re.findall(
        r'<tr class="attempt" data-attempt="(\d+)" data-outcome="(\w+)">'
        r'\s*<td class="num">\d+</td>\s*<td class="mono">([^<]*)</td>',
        reply.body,
    )
    assert attempts == [
        ("1", "waiting_for_retry", history.worker_id),
        ("2", "complete", history.worker_id),
    ]
    assert "card_declined" in reply.body  # why attempt 1 failed
    assert "&#34;charged&#34;: true" in reply.body  # the result
    assert "retry" not in re.findall(r'<div class="actions">(.*?)</div>', reply.body, re.S)[0]


def test_step_page_of_a_failed_step_shows_the_error_and_its_traceback(
    browser: Browser, history: History
) -> None:
    step = history.steps[(history.broken, "explode")]
    reply = browser.get(f"/steps/{step}")
    assert reply.status == 200
    body = reply.body
    assert '<dd class="bad mono">handler_error</dd>' in body
    assert "the widget is missing" in body
    (trace,) = re.findall(r'<pre class="traceback">(.*?)</pre>', body, re.S)
    trace = html.unescape(trace)
    assert trace.startswith("Traceback (most recent call last)")
    assert "ValueError: the widget is missing" in trace
    assert "in boom" in trace
    assert f'action="/steps/{step}/retry"' in body
    assert f'action="/steps/{step}/resolve"' in body
    assert "No result: the step failed." in body


def test_workers_page_shows_the_live_worker(browser: Browser, history: History) -> None:
    reply = browser.get("/workers")
    assert reply.status == 200
    assert_security_headers(reply)
    (row,) = re.findall(
        rf'<tr data-worker="{re.escape(history.worker_id)}" class="(\w+)">'
        r"(.*?)</tr>",
        reply.body,
        re.S,
    )
    assert row[0] == "alive"
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row[1], re.S)
    assert cells[1] == socket.gethostname()
    assert "/4" in cells[5]  # slots in use of max_concurrent_handlers


@pytest.mark.parametrize("path", ["/tasks", "/tasks?state=complete", "TASK", "STEP", "/workers"])
def test_live_fragment_is_only_the_live_part(browser: Browser, history: History, path: str) -> None:
    path = path.replace("TASK", f"/tasks/{history.shop[0]}")
    path = path.replace("STEP", f"/steps/{history.steps[(history.broken, 'explode')]}")
    full = browser.get(path)
    live = browser.get(path, **{"X-Duplex-Live": "1"})
    assert full.status == live.status == 200
    for tag in ("<html", "<head", "<header", "<main", '<div id="live"'):
        assert tag not in live.body
    assert '<div id="live"' in full.body
    assert live.body.strip()
    if path != "/workers":  # (heartbeat ages move between the two requests)
        assert live.body.strip() in full.body
    assert_security_headers(live)


def test_live_fragment_of_an_error_is_one_line(browser: Browser) -> None:
    missing = str(uuid.uuid4())
    reply = browser.get(f"/tasks/{missing}", **{"X-Duplex-Live": "1"})
    assert reply.status == 404
    assert reply.body == f'<p class="live-error">404 Not Found: unknown task: {missing}</p>'


@pytest.mark.parametrize(
    ("name", "kind", "needle"),
    [
        ("dashboard.js", "javascript", "X-Duplex-Live"),
        ("dashboard.css", "text/css", ".state-complete"),
        ("favicon.svg", "image/svg+xml", "<svg"),
    ],
)
def test_static_files_ship_in_the_package(
    browser: Browser, name: str, kind: str, needle: str
) -> None:
    reply = browser.get(f"/static/{name}")
    assert reply.status == 200
    assert kind in reply.header("Content-Type")
    assert reply.header("X-Content-Type-Options") == "nosniff"
    assert needle in reply.body
    page = browser.get("/tasks").body
    # Pages load nothing from elsewhere: every script and style is one of ours.
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert ref.startswith("/"), ref


def test_head_answers_headers_only(browser: Browser) -> None:
    reply = browser.request("HEAD", "/tasks")
    assert reply.status == 200
    assert reply.body == ""


# --- 2. bad input: clear error pages, never a traceback ------------------------------------


MISSING = "7f1c1a3e-0000-4000-8000-000000000000"


@pytest.mark.parametrize(
    ("method", "path", "status", "expected"),
    [
        ("GET", f"/tasks/{MISSING}", 404, f"unknown task: {MISSING}"),
        ("GET", f"/steps/{MISSING}", 404, f"unknown step: {MISSING}"),
        ("GET", f"/tasks/{MISSING.upper()}", 404, f"unknown task: {MISSING}"),
        ("GET", "/tasks/not-a-uuid", 404, "unknown task: not-a-uuid (not a UUID)"),
        ("GET", "/steps/1234", 404, "unknown step: 1234 (not a UUID)"),
        ("GET", "/tasks?state=bogus", 400, "state: unknown value 'bogus'; one of "),
        ("GET", "/tasks?status=finished", 400, "status: unknown value 'finished'; one of "),
        ("GET", "/tasks?since=yesterday", 400, "since: not a date and time: 'yesterday'"),
        ("GET", "/tasks?until=2026-13-01T00:00", 400, "until: not a date and time"),
        (
            "GET",
            "/tasks?since=2026-01-02T00:00&until=2026-01-01T00:00",
            400,
            "since: must be earlier than until",
        ),
        (
            "GET",
            "/tasks?since=2026-01-01T00:00&until=2026-01-01T00:00",
            400,
            "since: must be earlier than until",
        ),
        ("GET", "/tasks?before=garbage", 400, "before: not a page position: 'garbage'"),
        ("GET", "/tasks?after=2026-01-01T00:00~" + MISSING, 400, "after: not a page position"),
        (
            "GET",
            "/tasks?after=2026-01-01T00:00%2B00:00~not-a-uuid",
            400,
            "after: not a page position",
        ),
        (
            "GET",
            f"/tasks?before=2026-01-01T00:00%2B00:00~{MISSING}"
            f"&after=2026-01-01T00:00%2B00:00~{MISSING}",
            400,
            "before, after: give one of them, not both",
        ),
        ("GET", "/tasks?name=" + "x" * 256, 400, "name: longer than 255 characters"),
        ("GET", "/nope", 404, "no such page: /nope"),
        ("GET", f"/tasks/{MISSING}/steps", 404, "no such page"),
        ("GET", "/static/nope.js", 404, "no such file: nope.js"),
        ("GET", "/static/..%2F__init__.py", 404, "no such page"),
        ("GET", "/static/.", 404, "no such file"),
        ("DELETE", "/tasks", 405, "DELETE is not allowed here"),
        ("POST", "/tasks", 405, "POST is not allowed here"),
        ("PUT", f"/steps/{MISSING}/retry", 405, "PUT is not allowed here"),
        ("GET", f"/tasks/{MISSING}/cancel", 405, "GET is not allowed here"),
        ("POST", "/static/dashboard.js", 405, "POST is not allowed here"),
    ],
)
def test_bad_requests_get_a_clear_error_page(
    browser: Browser, method: str, path: str, status: int, expected: str
) -> None:
    reply = browser.request(method, path)
    message = assert_error_page(reply, status, expected)
    if expected.startswith("unknown "):
        assert message == expected
    assert_security_headers(reply)


def test_an_unexpected_error_is_a_500_page_without_a_traceback(
    history: History, tmp_path: Path
) -> None:
    class Broken(Database):
        @contextmanager
        def read(self) -> Iterator[Any]:
            raise RuntimeError(f"a bug that mentions {history.markers[history.shop[0]]}")
            yield  # pragma: no cover

    db = Broken(DatabaseSettings(url=str(history.db.url)))
    logged: list[str] = []
    from loguru import logger

    sink = logger.add(logged.append, level="DEBUG", format="{message}")
    try:
        with serving(make_settings(str(db.url)), db) as port:
            reply = Browser(port).get("/tasks?name=secret-filter")
            live = Browser(port).get("/tasks", **{"X-Duplex-Live": "1"})
    finally:
        logger.remove(sink)
        db.dispose()
    assert assert_error_page(reply, 500) == "internal error"
    assert live.status == 500
    assert NO_TRACEBACK not in live.body
    text = "".join(logged)
    assert "GET /tasks failed" in text
    assert "RuntimeError" in text
    # The log names the route and the exception's type: no value, no query string.
    assert history.markers[history.shop[0]] not in text
    assert "secret-filter" not in text
    assert NO_TRACEBACK not in text


# --- 3. operator actions ------------------------------------------------------------------


POLICY = RetryPolicy(base_ms=0, multiplier=1.0, max_ms=0, jitter=0.0)


@pytest.fixture(scope="module")
def migrated_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("migrated") / "ops.db"
    sqlite_database(path).dispose()
    return path


@dataclass
class Ops:
    """A database moved by hand, a dashboard serving it, and a namespace of this test's own."""

    db: Database
    port: int
    namespace: str = field(default_factory=lambda: f"ns-{uuid.uuid4().hex[:12]}")

    def submit(self, template: str = OPS, namespace: str | None = None) -> str:
        text = template.replace(
            'namespace = "manual"', f'namespace = "{namespace or self.namespace}"'
        )
        return Client(self.db).submit(parse_template(text), {"k": 1})

    def browser(self) -> Browser:
        """A browser that has seen a page with a form (a spare task's), so holds a csrf token."""
        spare = self.submit(SINGLE, namespace=f"{self.namespace}-spare")
        browser = Browser(self.port)
        assert f'action="/tasks/{spare}/cancel"' in browser.get(f"/tasks/{spare}").body
        assert browser.csrf
        assert browser.cookies.get("duplex_csrf")
        return browser

    def claim(self, *names: str) -> list[ClaimedStep]:
        with self.db.write() as conn:
            claimed = claim_ready_steps(
                conn, worker_id="w-test", namespaces=[self.namespace], limit=100, now=utcnow()
            )
        assert sorted(s.name for s in claimed) == sorted(names)
        return claimed

    def finish(self, step: ClaimedStep, *, ok: bool = True) -> None:
        now = utcnow()
        if ok:
            outcome = StepOutcome(step, now, now, result={"from": step.name})
        else:
            failure = StepFailure("handler_error", f"{step.name} failed", True, "Traceback ...")
            outcome = StepOutcome(step, now, now, failure=failure)
        with self.db.write() as conn:
            commit_outcomes(conn, [outcome], policy=POLICY, now=now, rng=random.Random(0))

    def step(self, task: str, name: str) -> str:
        return _step_uuids(self.db)[(task, name)]

    def states(self, task: str) -> tuple[str, dict[str, str]]:
        with self.db.read() as conn:
            state = conn.execute(select(tasks.c.state).where(tasks.c.task_uuid == task))
            steps = conn.execute(
                select(workflow_steps.c.name, workflow_steps.c.state).where(
                    workflow_steps.c.task_uuid == task
                )
            )
            return str(state.scalar_one()), {str(n): str(s) for n, s in steps}

    def transitions(self) -> int:
        with self.db.read() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(workflow_step_transitions)
                ).scalar_one()
            )

    def last_transitions(self, step_uuid: str) -> tuple[str, str, str]:
        """(to_state, worker_id, reason) of the step's latest transition row."""
        tr = workflow_step_transitions.c
        with self.db.read() as conn:
            row = conn.execute(
                select(tr.to_state, tr.worker_id, tr.reason)
                .where(tr.step_uuid == step_uuid)
                .order_by(tr.id.desc())
                .limit(1)
            ).one()
        return str(row[0]), str(row[1]), str(row[2])

    def dry_run(
        self, operation: Callable[..., OperatorReport], target: str
    ) -> OperatorReport | TransitionError:
        """What the CLI's own function says, in a transaction that is rolled back."""
        with self.db.engine.connect() as conn:
            transaction = conn.begin()
            try:
                return operation(conn, target, operator="operator:dry-run", now=utcnow())
            except TransitionError as exc:
                return exc
            finally:
                transaction.rollback()

    def with_error_in_b(self) -> str:
        """A task whose a is complete and b in error (its one attempt used)."""
        task = self.submit()
        (a,) = self.claim("a")
        self.finish(a)
        (b,) = self.claim("b")
        self.finish(b, ok=False)
        assert self.states(task)[1] == {"a": "complete", "b": "error", "c": "pending"}
        return task


def _site(path: Path, **dashboard: Any) -> Iterator[Ops]:
    # One server per module: stopping one costs half a second (cheroot's poll interval).
    db = sqlite_database(path)
    try:
        with serving(make_settings(str(db.url), dashboard=dashboard), db) as port:
            yield Ops(db, port)
    finally:
        db.dispose()


@pytest.fixture(scope="module")
def ops_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    yield from _site(tmp_path_factory.mktemp("ops") / "ops.db")


@pytest.fixture(scope="module")
def locked_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    """The same, with ``dashboard.token`` set: every page needs a login."""
    yield from _site(tmp_path_factory.mktemp("locked") / "locked.db", token=TOKEN)


@pytest.fixture
def ops(ops_site: Ops) -> Ops:
    return Ops(ops_site.db, ops_site.port)


@pytest.fixture
def locked(locked_site: Ops) -> Ops:
    return Ops(locked_site.db, locked_site.port)


def flash_after(browser: Browser, reply: Reply) -> str:
    """Follow an action's redirect; return the flash line the page shows (and check it once)."""
    assert reply.status == 303, reply.body
    location = reply.header("Location")
    page = browser.get(location)
    assert page.status == 200
    (line,) = re.findall(r'<p class="flash" role="status">(.*?)</p>', page.body)
    assert "duplex_flash" not in browser.cookies  # shown once, then cleared
    assert '<p class="flash"' not in browser.get(location).body
    return html.unescape(line)


def test_cancel_a_task(ops: Ops) -> None:
    task = ops.submit()
    expected = ops.dry_run(cancel_task, task)
    assert isinstance(expected, OperatorReport)
    browser = Browser(ops.port)
    assert f'action="/tasks/{task}/cancel"' in browser.get(f"/tasks/{task}").body
    written = ops.transitions()
    reply = browser.post(f"/tasks/{task}/cancel", {"operator": "ann", "reason": "wrong order"})
    assert reply.header("Location") == f"/tasks/{task}"
    assert urllib.parse.unquote(reply.set_cookies()["duplex_flash"]) == expected.summary
    assert flash_after(browser, reply) == expected.summary
    assert ops.states(task) == ("cancelled", dict.fromkeys("abc", "cancelled"))
    assert ops.transitions() == written + 3  # one row per step cancelled
    assert ops.last_transitions(ops.step(task, "a")) == (
        "cancelled",
        "operator:ann (dashboard)",
        "cancelled by operator: wrong order",
    )


def test_retry_a_step_in_error(ops: Ops) -> None:
    task = ops.with_error_in_b()
    b = ops.step(task, "b")
    expected = ops.dry_run(retry_step, b)
    assert isinstance(expected, OperatorReport)
    browser = Browser(ops.port)
    browser.get(f"/steps/{b}")
    reply = browser.post(f"/steps/{b}/retry", {"operator": "bob", "reason": "disk replaced"})
    assert reply.header("Location") == f"/steps/{b}"
    assert flash_after(browser, reply) == expected.summary
    assert ops.states(task) == ("in_progress", {"a": "complete", "b": "enqueued", "c": "pending"})
    assert ops.last_transitions(b) == (
        "enqueued",
        "operator:bob (dashboard)",
        "retried by operator: disk replaced (max_attempts raised to 2)",
    )


def test_resolve_a_step_in_error(ops: Ops) -> None:
    task = ops.with_error_in_b()
    b = ops.step(task, "b")
    expected = ops.dry_run(resolve_step, b)
    assert isinstance(expected, OperatorReport)
    browser = Browser(ops.port)
    browser.get(f"/steps/{b}")
    reply = browser.post(f"/steps/{b}/resolve", {"operator": "cy", "reason": ""})
    assert flash_after(browser, reply) == expected.summary
    assert "enqueued c" in expected.summary
    assert ops.states(task)[1] == {"a": "complete", "b": "resolved_manually", "c": "enqueued"}
    assert ops.last_transitions(b) == (
        "resolved_manually",
        "operator:cy (dashboard)",
        "resolved by operator",
    )


def _impossible(ops: Ops, kind: str) -> tuple[str, str, Callable[..., OperatorReport], str]:
    """Set up an impossible move; return (task, target uuid, CLI function, action path)."""
    if kind == "retry a complete step":
        task = ops.submit()
        (a,) = ops.claim("a")
        ops.finish(a)
        target = ops.step(task, "a")
        return task, target, retry_step, f"/steps/{target}/retry"
    if kind == "resolve a running step":
        task = ops.submit()
        ops.claim("a")
        target = ops.step(task, "a")
        return task, target, resolve_step, f"/steps/{target}/resolve"
    if kind == "cancel a complete task":
        task = ops.submit(SINGLE)
        (only,) = ops.claim("only")
        ops.finish(only)
        return task, task, cancel_task, f"/tasks/{task}/cancel"
    assert kind == "retry a step of a cancelled task"
    task = ops.with_error_in_b()
    with ops.db.write() as conn:
        cancel_task(conn, task, operator="operator:setup", now=utcnow())
    target = ops.step(task, "b")
    return task, target, retry_step, f"/steps/{target}/retry"


@pytest.mark.parametrize(
    "kind",
    [
        "retry a complete step",
        "resolve a running step",
        "cancel a complete task",
        "retry a step of a cancelled task",
    ],
)
def test_impossible_moves_are_409_with_the_cli_message(ops: Ops, kind: str) -> None:
    task, target, operation, path = _impossible(ops, kind)
    expected = ops.dry_run(operation, target)
    assert isinstance(expected, TransitionError)
    browser = ops.browser()
    before, written = ops.states(task), ops.transitions()
    reply = browser.post(path, {"operator": "ann", "reason": "try it"})
    assert assert_error_page(reply, 409) == str(expected)
    assert (ops.states(task), ops.transitions()) == (before, written)


def test_unknown_targets_of_actions_are_404(ops: Ops) -> None:
    browser = ops.browser()
    written = ops.transitions()
    for path, what in [
        (f"/tasks/{MISSING}/cancel", f"unknown task: {MISSING}"),
        (f"/steps/{MISSING}/retry", f"unknown step: {MISSING}"),
        ("/steps/nope/resolve", "unknown step: nope (not a UUID)"),
    ]:
        reply = browser.post(path, {"operator": "ann"})
        assert assert_error_page(reply, 404) == what
    assert ops.transitions() == written


def _refused(ops: Ops, send: Callable[[Browser, str], Reply], status: int, *words: str) -> None:
    """The request is refused with ``status``, and the task it aimed at is untouched."""
    task = ops.submit()
    browser = Browser(ops.port)
    assert browser.get(f"/tasks/{task}").status == 200
    assert browser.csrf
    assert browser.cookies.get("duplex_csrf")
    written = ops.transitions()
    reply = send(browser, f"/tasks/{task}/cancel")
    assert_error_page(reply, status, *words)
    assert ops.states(task)[0] == "pending"
    assert ops.transitions() == written
    # The same browser, done right, succeeds: the refusal was about what was wrong.
    assert browser.get(f"/tasks/{task}").status == 200
    assert browser.post(f"/tasks/{task}/cancel", {"operator": "ann"}).status == 303
    assert ops.states(task)[0] == "cancelled"


FORM = {"operator": "ann", "reason": "x"}


def test_missing_csrf_token_is_403(ops: Ops) -> None:
    _refused(ops, lambda b, p: b.post(p, FORM, csrf=None), 403, "form token")


def test_wrong_csrf_token_is_403(ops: Ops) -> None:
    def send(browser: Browser, path: str) -> Reply:
        return browser.post(path, FORM, csrf=browser.csrf[:-2] + "xx")

    _refused(ops, send, 403, "form token")


def test_csrf_token_of_another_browser_is_403(ops: Ops) -> None:
    other = Browser(ops.port)
    other.get("/tasks")

    def send(browser: Browser, path: str) -> Reply:
        return browser.post(path, FORM, csrf=other.csrf)

    _refused(ops, send, 403, "form token")


def test_csrf_cookie_missing_is_403(ops: Ops) -> None:
    def send(browser: Browser, path: str) -> Reply:
        token = browser.csrf
        cookie = browser.cookies.pop("duplex_csrf")
        reply = browser.post(path, FORM, csrf=token)
        browser.cookies.setdefault("duplex_csrf", cookie)
        return reply

    _refused(ops, send, 403, "form token")


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:1"},
        {"Referer": "http://evil.example/page"},
    ],
)
def test_cross_site_requests_are_403(ops: Ops, headers: dict[str, str]) -> None:
    def send(browser: Browser, path: str) -> Reply:
        return browser.post(path, FORM, origin=None, headers=headers)

    _refused(ops, send, 403, "cross-site request refused")


def test_missing_operator_name_is_400(ops: Ops) -> None:
    _refused(ops, lambda b, p: b.post(p, {"reason": "x"}), 400, "operator: give your name")


def test_bad_operator_name_is_400(ops: Ops) -> None:
    _refused(ops, lambda b, p: b.post(p, {"operator": "<script>"}), 400, "operator: 1 to 64")


def test_too_long_reason_is_400(ops: Ops) -> None:
    def send(browser: Browser, path: str) -> Reply:
        return browser.post(path, {"operator": "ann", "reason": "r" * 1001})

    _refused(ops, send, 400, "reason: longer than 1000 characters")


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data; b=x", ""])
def test_wrong_content_type_is_415(ops: Ops, content_type: str) -> None:
    def send(browser: Browser, path: str) -> Reply:
        return browser.post(path, FORM, content_type=content_type)

    _refused(ops, send, 415, "send the form as a web form")


def test_oversized_form_is_413(ops: Ops) -> None:
    def send(browser: Browser, path: str) -> Reply:
        return browser.post(path, {"operator": "ann", "pad": "p" * 20_000})

    _refused(ops, send, 413, "too large")


# --- 4. login, sessions and headers -------------------------------------------------------


def login(browser: Browser, name: str, token: str, next_path: str = "/tasks") -> Reply:
    page = browser.get("/login")
    assert page.status == 200
    return browser.post("/login", {"name": name, "token": token, "next": next_path})


def test_with_a_token_pages_redirect_to_the_login(locked: Ops) -> None:
    task = locked.submit()
    browser = Browser(locked.port)
    for path in ["/tasks?state=pending", f"/tasks/{task}", "/workers", "/"]:
        reply = browser.get(path)
        assert reply.status == 303, path
        assert reply.header("Location") == "/login?next=" + urllib.parse.quote(path, safe="")
    # The live part and actions cannot be redirected: 401, with nothing written.
    live = browser.get("/tasks", **{"X-Duplex-Live": "1"})
    assert live.status == 401
    assert NO_TRACEBACK not in live.body
    browser.get("/login")
    reply = browser.post(f"/tasks/{task}/cancel", {"operator": "ann"})
    assert_error_page(reply, 401, "log in first")
    assert locked.states(task)[0] == "pending"
    # Static files and the login form are public.
    assert browser.get("/static/dashboard.css").status == 200
    login_page = browser.get("/login?next=%2Fworkers")
    assert login_page.status == 200
    assert 'name="token"' in login_page.body
    assert '<input type="hidden" name="next" value="/workers">' in login_page.body
    assert_security_headers(login_page)


def test_bearer_token_works_and_a_wrong_one_does_not(locked: Ops) -> None:
    browser = Browser(locked.port)
    assert browser.get("/tasks", Authorization=f"Bearer {TOKEN}").status == 200
    assert browser.get("/workers", Authorization=f"Bearer {TOKEN}").status == 200
    assert browser.get("/tasks", Authorization=f"Bearer {TOKEN}x").status == 303
    assert browser.get("/tasks", Authorization=f"Basic {TOKEN}").status == 303
    assert browser.get("/tasks", Authorization="Bearer ").status == 303


def test_login_with_the_wrong_token_is_401(locked: Ops) -> None:
    browser = Browser(locked.port)
    reply = login(browser, "alice", "not-the-token-at-all")
    assert reply.status == 401
    assert NO_TRACEBACK not in reply.body
    assert reply.message == "wrong token"
    assert "duplex_session" not in reply.set_cookies()
    assert browser.get("/tasks").status == 303


def test_login_without_a_name_is_400(locked: Ops) -> None:
    reply = login(Browser(locked.port), "", TOKEN)
    assert reply.status == 400
    assert "operator: give your name" in reply.message


def test_login_without_csrf_is_403(locked: Ops) -> None:
    browser = Browser(locked.port)
    browser.get("/login")
    reply = browser.post("/login", {"name": "alice", "token": TOKEN}, csrf=None)
    assert_error_page(reply, 403, "form token")
    assert "duplex_session" not in reply.set_cookies()


def test_login_then_actions_record_the_logged_in_name(locked: Ops) -> None:
    task = locked.submit()
    browser = Browser(locked.port)
    reply = login(browser, "alice", TOKEN, f"/tasks/{task}")
    assert reply.status == 303
    assert reply.header("Location") == f"/tasks/{task}"
    (line,) = [c for c in reply.headers.get_all("Set-Cookie") or [] if "duplex_session=" in c]
    assert "HttpOnly" in line
    assert "SameSite=Strict" in line
    page = browser.get(f"/tasks/{task}")
    assert page.status == 200
    assert "<span>alice</span>" in page.body  # who is logged in
    assert 'name="operator"' not in page.body  # the name comes from the login
    expected = locked.dry_run(cancel_task, task)
    assert isinstance(expected, OperatorReport)
    # A name typed in the form does not override the login.
    reply = browser.post(f"/tasks/{task}/cancel", {"operator": "mallory", "reason": "dup"})
    assert flash_after(browser, reply) == expected.summary
    assert locked.last_transitions(locked.step(task, "a")) == (
        "cancelled",
        "operator:alice (dashboard)",
        "cancelled by operator: dup",
    )
    # Logging out ends the session.
    assert browser.post("/logout").header("Location") == "/login"
    assert "duplex_session" not in browser.cookies
    assert browser.get("/tasks").status == 303


def test_a_forged_session_is_refused(locked: Ops) -> None:
    browser = Browser(locked.port)
    assert login(browser, "alice", TOKEN).status == 303
    body, signature = browser.cookies["duplex_session"].rsplit(".", 1)
    browser.cookies["duplex_session"] = body + "." + signature[::-1]
    assert browser.get("/tasks").status == 303
    browser.cookies["duplex_session"] = "bWFsbG9yeQ"
    assert browser.get("/tasks").status == 303


@pytest.mark.parametrize(
    "target",
    ["//evil.example", "//evil.example/tasks", "https://evil.example/", "/\\evil.example", "tasks"],
)
def test_login_refuses_an_open_redirect(locked: Ops, target: str) -> None:
    browser = Browser(locked.port)
    form = browser.get("/login?next=" + urllib.parse.quote(target, safe=""))
    assert '<input type="hidden" name="next" value="/tasks">' in form.body
    reply = browser.post("/login", {"name": "alice", "token": TOKEN, "next": target})
    assert reply.status == 303
    assert reply.header("Location") == "/tasks"


def test_without_a_token_the_login_page_is_not_needed(ops: Ops) -> None:
    browser = Browser(ops.port)
    assert browser.get("/login").header("Location") == "/tasks"
    assert browser.get("/tasks").status == 200


@pytest.mark.parametrize("path", ["/tasks", "/workers", "/login", f"/tasks/{MISSING}", "/nope"])
def test_html_answers_carry_the_security_headers(locked: Ops, path: str) -> None:
    reply = Browser(locked.port).get(path, Authorization=f"Bearer {TOKEN}")
    assert reply.header("Content-Type").startswith("text/html")
    assert_security_headers(reply)
    assert reply.header("Cache-Control") == "no-store"


# --- subprocess: the real `duplex dashboard` ----------------------------------------------


def dashboard_dir(directory: Path, url: str, *, token: str | None = None) -> Duplex:
    """A working directory whose settings point ``duplex dashboard`` at ``url``, port 0."""
    duplex = make_duplex(directory)
    lines = [
        "[database]",
        f"url = {json.dumps(url)}",
        "",
        "[dashboard]",
        "port = 0",
        *([f"token = {json.dumps(token)}"] if token else []),
        "",
        "[logging]",
        'level = "DEBUG"',
        "",
    ]
    (duplex.cwd / "settings.toml").write_text("\n".join(lines))
    return duplex


def dashboard_port(duplex: Duplex, process: subprocess.Popen[bytes], host: str) -> int:
    """Wait for the log line naming the address bound."""
    found: list[int] = []

    def serving() -> bool:
        assert process.poll() is None, f"dashboard exited early:\n{duplex.stderr_text()}"
        for bound, port in SERVING.findall(duplex.stderr_text()):
            assert bound == host
            found.append(int(port))
        return bool(found)

    assert wait_until(serving, 20), f"no serving line:\n{duplex.stderr_text()}"
    return found[0]


@contextmanager
def dashboard_process(duplex: Duplex, *args: str, host: str = "127.0.0.1") -> Iterator[int]:
    """Run ``duplex dashboard``; yield its port; stop it with SIGTERM: it must exit 0."""
    process = duplex.start("dashboard", *args)
    try:
        port = dashboard_port(duplex, process, host)
        yield port
        assert process.poll() is None, duplex.stderr_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, duplex.stderr_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert NO_TRACEBACK not in duplex.stderr_text(), duplex.stderr_text()


@pytest.fixture
def sqlite_dir(tmp_path: Path, migrated_copy: Path) -> Duplex:
    duplex = dashboard_dir(tmp_path / "work", f"sqlite:///{tmp_path / 'work' / 'dash.db'}")
    shutil.copyfile(migrated_copy, tmp_path / "work" / "dash.db")
    return duplex


@pytest.mark.e2e
def test_off_loopback_without_a_token_refuses_in_one_line(sqlite_dir: Duplex) -> None:
    result = sqlite_dir.run("dashboard", "--host", "0.0.0.0", "--port", "0", timeout=30)
    line = assert_one_line_error(result, "dashboard.token", "0.0.0.0")
    assert line.startswith("duplex: error: dashboard:")


@pytest.mark.e2e
def test_off_loopback_with_a_token_serves_and_stops_on_sigterm(sqlite_dir: Duplex) -> None:
    env_token = {"DUPLEX_DASHBOARD__TOKEN": TOKEN}
    sqlite_dir.env.update(env_token)
    with dashboard_process(sqlite_dir, "--host", "0.0.0.0", host="0.0.0.0") as port:
        browser = Browser(port)
        assert browser.get("/tasks").status == 303  # the token is needed here too
        assert browser.get("/tasks", Authorization=f"Bearer {TOKEN}").status == 200
    assert TOKEN not in sqlite_dir.stderr_text()


@pytest.mark.e2e
def test_pages_never_log_task_data(sqlite_dir: Duplex) -> None:
    db = Database(DatabaseSettings(url=f"sqlite:///{sqlite_dir.cwd / 'dash.db'}"))
    marker = f"personal-{uuid.uuid4().hex}"
    try:
        template = parse_template(f'{SINGLE}inputs = {{ secret = "{marker}" }}\n')
        task = Client(db).submit(template, {"customer": {"email": f"{marker}@example.com"}})
        step = _step_uuids(db)[(task, "only")]
    finally:
        db.dispose()
    with dashboard_process(sqlite_dir) as port:
        browser = Browser(port)
        page = browser.get(f"/tasks/{task}")
        assert page.status == 200
        assert f"{marker}@example.com" in page.body
        assert marker in browser.get(f"/steps/{step}").body
        assert marker in browser.get(f"/tasks/{task}", **{"X-Duplex-Live": "1"}).body
        assert browser.get(f"/tasks?name={marker}").status == 200
        assert browser.get(f"/tasks?state={marker}").status == 400
        assert browser.get(f"/nope/{marker}").status == 404
        reply = browser.post(f"/tasks/{task}/cancel", {"operator": "ann", "reason": marker})
        assert reply.status == 303
    logged = sqlite_dir.stderr_text() + (sqlite_dir.stdout_path.read_text(errors="replace"))
    assert "serving http://" in logged
    assert marker not in logged, logged


# --- 5. the database goes away and comes back (PostgreSQL, through a TCP proxy) ------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``; ``stop`` closes the listener and every
    connection (the database is gone), ``start`` listens on the same port again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._acceptor.start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                _close(sock)

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        if listener is not None:
            listener.close()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            _close(sock)

    @property
    def connections(self) -> int:
        with self._lock:
            return sum(1 for s in self._sockets if s.fileno() != -1)


def _close(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture
def proxy(pg_url: str) -> Iterator[TcpProxy]:
    url = make_url(pg_url)
    tcp = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    tcp.start()
    try:
        yield tcp
    finally:
        tcp.stop()


def _timed_get(browser: Browser, path: str, **headers: str) -> tuple[Reply, float]:
    started = time.monotonic()
    reply = browser.get(path, **headers)
    return reply, time.monotonic() - started


@pytest.mark.e2e
@pytest.mark.postgres
def test_dashboard_keeps_serving_through_a_database_outage(
    pg_url: str, proxy: TcpProxy, tmp_path: Path
) -> None:
    direct = Database(DatabaseSettings(url=pg_url))
    try:
        upgrade_to_head(direct)
        task = Client(direct).submit(parse_template(SINGLE), {"k": 1})
    finally:
        direct.dispose()
    through_proxy = make_url(pg_url).set(host="127.0.0.1", port=proxy.port).render_as_string(False)
    duplex = dashboard_dir(tmp_path / "work", through_proxy)
    with dashboard_process(duplex) as port:
        browser = Browser(port, timeout=10)
        page = browser.get("/tasks")
        assert page.status == 200
        assert task_rows(page) == [task]
        assert browser.get(f"/tasks/{task}").status == 200
        assert proxy.connections > 0  # the dashboard really goes through the proxy

        proxy.stop()  # the database is gone
        for path in ["/tasks", f"/tasks/{task}", "/workers"]:
            reply, took = _timed_get(browser, path)
            assert took < 5, f"{path} took {took:.1f} s with the database gone"
            assert_error_page(reply, 503, "database is unavailable", "retries on its own")
        live, took = _timed_get(browser, "/tasks", **{"X-Duplex-Live": "1"})
        assert took < 5
        assert live.status == 503
        assert live.body.startswith('<p class="live-error">503 Service Unavailable: ')
        assert "database is unavailable" in live.body
        assert "\n" not in live.body
        assert browser.get("/static/dashboard.js").status == 200  # no database needed

        proxy.start()  # the database is back, on the same address
        assert wait_until(lambda: browser.get("/tasks").status == 200, 10)
        page = browser.get("/tasks")
        assert task_rows(page) == [task]
        assert browser.get(f"/tasks/{task}").status == 200
