"""The dashboard's pauses over real HTTP: the pauses in force on the task list, a task page's
notice and its Pause buttons, and Resume.

The dashboard is served in-process (``serving``) over a SQLite database. Pause and resume run
the storage functions of ``duplex pause``/``duplex resume`` behind the operator actions' login,
Origin and CSRF guard, and flash the line the CLI prints: the CLI itself is run in-process
(``cli_line``) to say what that line is. A wake socket recorded for a worker row stands in for
a worker of this host.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select

from duplex import Client
from duplex.cli.pauses import cmd_pause, cmd_resume
from duplex.clock import utcnow
from duplex.intake.wake import bind_wake_socket
from duplex.settings import Settings
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.models import pauses
from duplex.storage.pauses import Pause, list_pauses, pause
from duplex.storage.workers import record_wake_address, register_worker
from duplex.templates import parse_template
from tests.conftest import make_settings, sqlite_database
from tests.dashboard.support import Browser, Reply, serving
from tests.dashboard.test_dashboard_http import TOKEN, assert_error_page, flash_after, login

ONE_STEP = """
name = "{name}"
namespace = "{namespace}"
[[steps]]
name = "only"
handler = "t.h"
"""


@dataclass
class Site:
    db: Database
    port: int
    settings: Settings

    def submit(self) -> tuple[str, str, str]:
        """A new task of its own template in its own namespace: (task, namespace, template)."""
        suffix = uuid.uuid4().hex[:10]
        namespace, template = f"ns-{suffix}", f"tpl_{suffix}"
        text = ONE_STEP.format(name=template, namespace=namespace)
        task = Client(self.db).submit(parse_template(text), {})
        return task, namespace, template

    def pauses(self) -> dict[tuple[str, str], Pause]:
        with self.db.read() as conn:
            return {(p.kind, p.name): p for p in list_pauses(conn)}

    def pause_rows(self) -> int:
        with self.db.read() as conn:
            return int(conn.execute(select(func.count()).select_from(pauses)).scalar_one())

    def claimable(self, namespace: str) -> int:
        """How many steps of ``namespace`` a claim would take (rolled back: nothing moves)."""
        with self.db.engine.connect() as conn:
            transaction = conn.begin()
            try:
                claimed = claim_ready_steps(
                    conn, worker_id="w-test", namespaces=[namespace], limit=10, now=utcnow()
                )
            finally:
                transaction.rollback()
        return len(claimed)

    def browser(self, task: str) -> Browser:
        """A browser with the form token of ``task``'s page (its Pause forms carry one)."""
        browser = Browser(self.port)
        assert browser.get(f"/tasks/{task}").status == 200
        assert browser.csrf
        return browser

    def cli_line(self, command: str, capsys: pytest.CaptureFixture[str], **target: str) -> str:
        """What ``duplex pause|resume`` prints for ``target`` (it runs, in this process)."""
        args = argparse.Namespace(
            namespace=target.get("namespace"), template=target.get("template"), reason=None
        )
        capsys.readouterr()
        assert (cmd_pause if command == "pause" else cmd_resume)(args, self.settings) == 0
        return capsys.readouterr().out.rstrip("\n")


def _serve(path: Path, **sections: dict[str, str]) -> Iterator[Site]:
    db = sqlite_database(path)
    settings = make_settings(str(db.url), **sections)
    try:
        with serving(settings, db) as port:
            yield Site(db, port, settings)
    finally:
        db.dispose()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    yield from _serve(tmp_path_factory.mktemp("pauses") / "pauses.db")


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    path = tmp_path_factory.mktemp("pauses_locked") / "locked.db"
    yield from _serve(path, dashboard={"token": TOKEN})


@pytest.fixture
def wake_socket(site: Site) -> Iterator[socket.socket]:
    """A live worker of this host as the dashboard sees it: a row with a wake address; the
    wake-ups sent before the test (submissions') are dropped."""
    listening, address, _ = bind_wake_socket()
    listening.setblocking(False)
    worker_id = f"w-{uuid.uuid4().hex[:8]}"
    with site.db.write() as conn:
        register_worker(
            conn, worker_id, hostname=socket.gethostname(), pid=os.getpid(), now=utcnow()
        )
        record_wake_address(conn, worker_id, address)
    try:
        yield listening
    finally:
        listening.close()


def wake_ups(listening: socket.socket) -> list[bytes]:
    """The datagrams received so far (each names the namespaces to look at, one a line)."""
    out = []
    while True:
        try:
            out.append(listening.recv(4096))
        except BlockingIOError:
            return out


def pause_rows_shown(reply: Reply) -> dict[tuple[str, str], list[str]]:
    """The task list's pauses section: (kind, name) -> its cells' text."""
    section = re.search(r'<section class="pauses" id="pauses">(.*?)</section>', reply.body, re.S)
    if section is None:
        return {}
    out = {}
    for kind, name, row in re.findall(
        r'<tr data-pause="([^"]+)" data-name="([^"]+)">(.*?)</tr>', section.group(1), re.S
    ):
        cells = [
            re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        ]
        assert 'action="/resume"' in row
        out[html.unescape(kind), html.unescape(name)] = [html.unescape(c) for c in cells]
    return out


def pause_forms(reply: Reply) -> list[str]:
    return re.findall(
        r'<form class="action pause" method="post" action="/pause" data-pause="(\w+)">', reply.body
    )


def paused_notices(reply: Reply) -> list[str]:
    return re.findall(r'<div class="paused" data-paused="(\w+)">', reply.body)


def test_the_task_list_shows_each_pause_in_force(site: Site) -> None:
    _, namespace, template = site.submit()
    browser = Browser(site.port)
    assert ("namespace", namespace) not in pause_rows_shown(browser.get("/tasks"))
    now = utcnow()
    with site.db.write() as conn:
        pause(
            conn,
            kind="namespace",
            name=namespace,
            operator="operator:kim",
            now=now,
            reason="supplier <down>",
        )
        pause(conn, kind="template", name=template, operator="operator:lee", now=now)
    shown = pause_rows_shown(browser.get("/tasks"))
    assert shown[("namespace", namespace)][:4] == [
        "namespace",
        namespace,
        "supplier <down>",
        "operator:kim",
    ]
    assert shown[("template", template)][:4] == ["template", template, "", "operator:lee"]
    assert shown[("template", template)][4].startswith(now.strftime("%Y-%m-%d"))
    # The live part (what the page's script refreshes) carries it too.
    live = browser.get("/tasks", **{"X-Duplex-Live": "1"})
    assert ("namespace", namespace) in pause_rows_shown(live)


def test_the_pause_button_writes_the_pause_with_operator_and_reason(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    task, namespace, template = site.submit()
    browser = Browser(site.port)
    page = browser.get(f"/tasks/{task}")
    assert pause_forms(page) == ["namespace", "template"]
    assert paused_notices(page) == []
    assert site.claimable(namespace) == 1

    form = {
        "kind": "namespace",
        "name": namespace,
        "operator": "ann",
        "reason": "outage",
        "next": f"/tasks/{task}",
    }
    reply = browser.post("/pause", form)
    assert reply.header("Location") == f"/tasks/{task}"
    line = flash_after(browser, reply)
    assert line == f"paused namespace '{namespace}': no new claims; running steps finish"
    (written,) = [p for key, p in site.pauses().items() if key == ("namespace", namespace)]
    assert (written.reason, written.paused_by) == ("outage", "operator:ann (dashboard)")
    assert site.claimable(namespace) == 0  # the pause holds the step back

    # The task page says so, offers Resume for the namespace and still Pause for the template.
    page = browser.get(f"/tasks/{task}")
    assert paused_notices(page) == ["namespace"]
    assert pause_forms(page) == ["template"]
    assert f"The namespace {namespace} is paused" in page.body
    assert "will not be claimed" in page.body

    # Pausing again keeps the first pause and says so with the CLI's own line.
    again_cli = site.cli_line("pause", capsys, namespace=namespace)
    assert "was already paused" in again_cli
    form.update(operator="bo", reason="another")
    again = browser.post("/pause", form)
    assert flash_after(browser, again) == again_cli
    assert site.pauses()[("namespace", namespace)] == written

    # A template's pause is the same form, kind "template"; and it is the CLI's line.
    reply = browser.post("/pause", {"kind": "template", "name": template, "operator": "ann"})
    assert reply.header("Location") == "/tasks"  # no next: the task list
    line = flash_after(browser, reply)
    assert line == f"paused template '{template}': no new claims; running steps finish"
    assert site.pauses()[("template", template)].reason is None


def test_resume_lifts_the_pause_and_wakes_this_hosts_workers(
    site: Site, wake_socket: socket.socket, capsys: pytest.CaptureFixture[str]
) -> None:
    task, namespace, template = site.submit()
    browser = site.browser(task)
    with site.db.write() as conn:
        pause(conn, kind="namespace", name=namespace, operator="operator:kim", now=utcnow())
        pause(conn, kind="template", name=template, operator="operator:kim", now=utcnow())
    wake_ups(wake_socket)

    reply = browser.post(
        "/resume", {"kind": "namespace", "name": namespace, "next": "/tasks?state=pending"}
    )
    assert reply.header("Location") == "/tasks?state=pending"
    assert flash_after(browser, reply) == f"resumed namespace '{namespace}'"
    assert ("namespace", namespace) not in site.pauses()
    assert wake_ups(wake_socket) == [namespace.encode()]
    assert site.claimable(namespace) == 0  # its template is still paused

    # A template's resume wakes the namespaces of its tasks.
    reply = browser.post("/resume", {"kind": "template", "name": template})
    assert flash_after(browser, reply) == f"resumed template '{template}'"
    assert wake_ups(wake_socket) == [namespace.encode()]
    assert site.claimable(namespace) == 1

    # Nothing to resume: the CLI's line, no wake-up.
    again = browser.post("/resume", {"kind": "template", "name": template})
    assert flash_after(browser, again) == site.cli_line("resume", capsys, template=template)
    assert "was not paused; nothing to do" in site.cli_line("resume", capsys, template=template)
    assert wake_ups(wake_socket) == []


def test_without_the_csrf_token_or_from_another_site_nothing_is_paused_or_resumed(
    site: Site,
) -> None:
    task, namespace, _ = site.submit()
    with site.db.write() as conn:
        pause(
            conn, kind="namespace", name=f"{namespace}-held", operator="operator:kim", now=utcnow()
        )
    browser = site.browser(task)
    rows = site.pause_rows()
    for path, name in (("/pause", namespace), ("/resume", f"{namespace}-held")):
        form = {"kind": "namespace", "name": name, "operator": "ann"}
        for token in (None, browser.csrf[:-2] + "xx"):
            assert_error_page(browser.post(path, form, csrf=token), 403, "form token")
        reply = browser.post(path, form, origin="http://evil.example")
        assert_error_page(reply, 403, "cross-site request refused")
    assert site.pause_rows() == rows
    assert ("namespace", f"{namespace}-held") in site.pauses()


@pytest.mark.parametrize(
    ("form", "status", "message"),
    [
        (
            {"kind": "queue", "name": "x"},
            400,
            "cannot pause a 'queue': only a namespace or a template",
        ),
        (
            {"kind": "namespace", "name": ""},
            400,
            "the namespace to pause or resume has an empty name",
        ),
        ({"kind": "namespace", "name": "x", "reason": "r" * 1001}, 400, "reason: longer than 1000"),
        ({"kind": "namespace", "name": "x", "operator": ""}, 400, "operator"),
    ],
)
def test_bad_pause_forms_are_one_line_and_write_nothing(
    site: Site, form: dict[str, str], status: int, message: str
) -> None:
    browser = site.browser(site.submit()[0])
    rows = site.pause_rows()
    sent = {"operator": "ann", **form}
    assert message in assert_error_page(browser.post("/pause", sent), status)
    assert site.pause_rows() == rows


def test_with_a_token_pause_and_resume_need_a_login_and_record_its_name(locked: Site) -> None:
    task, namespace, _ = locked.submit()
    browser = Browser(locked.port)
    browser.get("/login")  # a csrf token, but no session
    form = {"kind": "namespace", "name": namespace, "operator": "mallory"}
    for path in ("/pause", "/resume"):
        assert_error_page(browser.post(path, form), 401, "log in first")
    assert locked.pauses() == {}

    assert login(browser, "alice", TOKEN, f"/tasks/{task}").status == 303
    page = browser.get(f"/tasks/{task}")
    assert pause_forms(page) == ["namespace", "template"]
    assert 'name="operator"' not in page.body  # the name comes from the login
    assert browser.post("/pause", form).status == 303
    assert locked.pauses()[("namespace", namespace)].paused_by == "operator:alice (dashboard)"
    assert browser.post("/resume", form).status == 303
    assert locked.pauses() == {}
