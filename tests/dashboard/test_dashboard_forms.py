"""The dashboard's "send signal" and "complete with result" forms over real HTTP.

The dashboard is served in-process (``serving``) over a SQLite database moved by hand: a task
``prep -> confirm (a wait for the signal "go") -> after``. The forms run the CLI's own
``send_signal`` and ``complete_step`` behind the same login and CSRF guards as resolve and
retry, show the report's one line, wake this host's workers (a wake socket recorded for a
worker row stands in for a worker), and refuse bad input with one line, nothing written.
"""

from __future__ import annotations

import os
import random
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import func, select

from duplex import Client
from duplex.clock import utcnow
from duplex.commit.retry import RetryPolicy
from duplex.errors import TransitionError
from duplex.intake.wake import bind_wake_socket
from duplex.messages import ClaimedStep, StepOutcome
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.models import step_signals, workflow_step_transitions, workflow_steps
from duplex.storage.operations import OperatorReport, complete_step
from duplex.storage.results import commit_outcomes
from duplex.storage.signals import SignalReport, send_signal
from duplex.storage.workers import record_wake_address, register_worker
from duplex.templates import parse_template
from tests.conftest import make_settings, sqlite_database
from tests.dashboard.support import Browser, Reply, serving
from tests.dashboard.test_dashboard_http import TOKEN, assert_error_page, flash_after, login

GATE = """
name = "gate"
namespace = "NS"
[[steps]]
name = "prep"
handler = "t.h"
[[steps]]
name = "confirm"
kind = "wait"
signal = "go"
timeout_ms = 3600000
depends_on = ["prep"]
[[steps]]
name = "after"
handler = "t.h"
depends_on = ["confirm"]
"""
POLICY = RetryPolicy(base_ms=0, multiplier=1.0, max_ms=0, jitter=0.0)


@dataclass
class Site:
    db: Database
    port: int
    namespaces: dict[str, str] = field(default_factory=dict)  # task -> its own namespace

    def submit(self) -> str:
        namespace = f"ns-{uuid.uuid4().hex[:12]}"
        text = GATE.replace('namespace = "NS"', f'namespace = "{namespace}"')
        task = Client(self.db).submit(parse_template(text), {"k": 1})
        self.namespaces[task] = namespace
        return task

    def claim(self, task: str, name: str) -> ClaimedStep:
        with self.db.write() as conn:
            (claimed,) = claim_ready_steps(
                conn, worker_id="w-test", namespaces=[self.namespaces[task]], limit=10, now=utcnow()
            )
        assert claimed.name == name
        return claimed

    def waiting(self) -> str:
        """A task whose prep is complete: confirm waits for "go"."""
        task = self.submit()
        step = self.claim(task, "prep")
        now = utcnow()
        with self.db.write() as conn:
            outcome = StepOutcome(step, now, now, result={"prepped": True})
            commit_outcomes(conn, [outcome], policy=POLICY, now=now, rng=random.Random(0))
        assert self.states(task) == {"prep": "complete", "confirm": "waiting", "after": "pending"}
        return task

    def step(self, task: str, name: str) -> Any:
        ws = workflow_steps.c
        with self.db.read() as conn:
            return conn.execute(
                select(ws.step_uuid, ws.state, ws.results).where(
                    ws.task_uuid == task, ws.name == name
                )
            ).one()

    def states(self, task: str) -> dict[str, str]:
        ws = workflow_steps.c
        with self.db.read() as conn:
            rows = conn.execute(select(ws.name, ws.state).where(ws.task_uuid == task))
            return {str(n): str(s) for n, s in rows}

    def written(self) -> tuple[int, int]:
        """How many transition rows and signal rows there are: what a refusal leaves alone."""
        with self.db.read() as conn:
            count = select(func.count())
            return (
                conn.execute(count.select_from(workflow_step_transitions)).scalar_one(),
                conn.execute(count.select_from(step_signals)).scalar_one(),
            )

    def last_transition(self, step_uuid: str) -> tuple[str, str, str]:
        tr = workflow_step_transitions.c
        with self.db.read() as conn:
            row = conn.execute(
                select(tr.to_state, tr.worker_id, tr.reason)
                .where(tr.step_uuid == step_uuid)
                .order_by(tr.id.desc())
                .limit(1)
            ).one()
        return str(row[0]), str(row[1]), str(row[2])

    def dry_run(self, act: Any) -> Any:
        """What the CLI's own function says, in a transaction rolled back."""
        with self.db.engine.connect() as conn:
            transaction = conn.begin()
            try:
                return act(conn)
            except TransitionError as exc:
                return exc
            finally:
                transaction.rollback()

    def browser(self, task: str) -> Browser:
        browser = Browser(self.port)
        assert browser.get(f"/tasks/{task}").status == 200
        assert browser.csrf
        return browser


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    db = sqlite_database(tmp_path_factory.mktemp("forms") / "forms.db")
    try:
        with serving(make_settings(str(db.url)), db) as port:
            yield Site(db, port)
    finally:
        db.dispose()


@pytest.fixture
def ops(site: Site) -> Site:
    return Site(site.db, site.port)


@pytest.fixture
def wake_socket(site: Site) -> Iterator[socket.socket]:
    """A live worker of this host as the dashboard sees it: a row with a wake address."""
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


def drained(listening: socket.socket) -> socket.socket:
    """The socket, with the wake-ups sent so far (a submission's) read and dropped."""
    while True:
        try:
            listening.recv(100)
        except BlockingIOError:
            return listening


def signal_forms(reply: Reply) -> list[str]:
    return re.findall(r'action="/steps/([0-9a-f-]{36})/signal"', reply.body)


# --- send signal -----------------------------------------------------------------------------


def test_the_signal_form_is_on_a_waiting_wait_steps_row_only(ops: Site) -> None:
    task = ops.submit()
    browser = Browser(ops.port)
    assert signal_forms(browser.get(f"/tasks/{task}")) == []  # confirm is pending
    task = ops.waiting()
    confirm = ops.step(task, "confirm").step_uuid
    page = browser.get(f"/tasks/{task}")
    assert signal_forms(page) == [confirm]
    row = re.search(rf'<tr data-step="{confirm}" class="waiting">.*?</tr>', page.body, re.S)
    assert row is not None
    assert 'name="payload"' in row.group(0)
    assert "Send signal go" in row.group(0)
    assert 'name="reason"' not in row.group(0)  # a signal records no reason
    browser.post(f"/steps/{confirm}/signal", {"operator": "ann", "payload": "{}"})
    assert signal_forms(browser.get(f"/tasks/{task}")) == []  # complete: no form


def test_a_signal_completes_the_wait_and_its_dependent_is_ready(
    ops: Site, wake_socket: socket.socket
) -> None:
    task = ops.waiting()
    confirm = ops.step(task, "confirm").step_uuid
    browser = ops.browser(task)
    expected = ops.dry_run(
        lambda conn: send_signal(
            conn, task, "go", {"dock": 7}, signal_id="s-1", sent_by="dry", now=utcnow()
        )
    )
    assert isinstance(expected, SignalReport)
    form = {"operator": "ann", "payload": '{"dock": 7}', "signal_id": "s-1"}
    drained(wake_socket)
    reply = browser.post(f"/steps/{confirm}/signal", form)
    assert reply.header("Location") == f"/tasks/{task}"
    assert flash_after(browser, reply) == expected.summary
    assert "enqueued after" in expected.summary
    assert ops.states(task) == {"prep": "complete", "confirm": "complete", "after": "enqueued"}
    assert ops.step(task, "confirm").results == {"dock": 7}
    assert ops.last_transition(confirm) == (
        "complete",
        "operator:ann (dashboard)",
        "signal go received (id s-1)",
    )
    # This host's workers were told, after the commit, that the namespace has work.
    assert wake_socket.recv(100) == ops.namespaces[task].encode()
    with pytest.raises(BlockingIOError):
        wake_socket.recv(100)
    # The same signal id again changes nothing, and says so.
    written = ops.written()
    again = browser.post(f"/steps/{confirm}/signal", form)
    assert "already received" in flash_after(browser, again)
    assert ops.written() == written


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{not json", "payload: not JSON (Expecting property name enclosed in double quotes"),
        ('{"x": NaN}', "payload: not JSON (NaN is not a JSON value)"),
        ("", "payload: give a JSON value"),
    ],
)
def test_bad_json_is_one_line_and_nothing_is_written(ops: Site, payload: str, message: str) -> None:
    task = ops.waiting()
    confirm = ops.step(task, "confirm").step_uuid
    browser = ops.browser(task)
    written = ops.written()
    reply = browser.post(f"/steps/{confirm}/signal", {"operator": "ann", "payload": payload})
    assert assert_error_page(reply, 400).startswith(message)
    assert ops.written() == written
    assert ops.states(task)["confirm"] == "waiting"


def test_signals_the_wait_cannot_take_are_refused_with_the_cli_message(ops: Site) -> None:
    task = ops.waiting()
    steps = {name: ops.step(task, name).step_uuid for name in ("prep", "confirm")}
    browser = ops.browser(task)
    written = ops.written()
    reply = browser.post(f"/steps/{steps['prep']}/signal", {"operator": "ann", "payload": "{}"})
    assert assert_error_page(reply, 400) == "step prep is not a wait step: it takes no signal"
    assert ops.written() == written
    ok = browser.post(f"/steps/{steps['confirm']}/signal", {"operator": "ann", "payload": "1"})
    assert ok.status == 303
    assert ops.step(task, "confirm").results == {"payload": 1}
    expected = ops.dry_run(
        lambda conn: send_signal(conn, task, "go", 2, signal_id=None, sent_by="x", now=utcnow())
    )
    assert isinstance(expected, TransitionError)
    written = ops.written()
    late = browser.post(f"/steps/{steps['confirm']}/signal", {"operator": "ann", "payload": "2"})
    assert assert_error_page(late, 409) == str(expected)
    assert ops.written() == written


def test_a_signal_without_the_csrf_token_is_refused(ops: Site) -> None:
    task = ops.waiting()
    confirm = ops.step(task, "confirm").step_uuid
    browser = ops.browser(task)
    written = ops.written()
    form = {"operator": "ann", "payload": "{}"}
    for token in (None, browser.csrf[:-2] + "xx"):
        reply = browser.post(f"/steps/{confirm}/signal", form, csrf=token)
        assert_error_page(reply, 403, "form token")
        assert ops.written() == written
    reply = browser.post(f"/steps/{confirm}/signal", form, origin="http://evil.example")
    assert_error_page(reply, 403, "cross-site request refused")
    assert ops.written() == written
    assert ops.states(task)["confirm"] == "waiting"


# --- complete with result ---------------------------------------------------------------------


def complete_form(reply: Reply, step_uuid: str) -> bool:
    return f'action="/steps/{step_uuid}/complete"' in reply.body


def test_complete_with_a_result_moves_the_workflow_on(
    ops: Site, wake_socket: socket.socket
) -> None:
    task = ops.submit()
    prep = ops.step(task, "prep").step_uuid
    browser = Browser(ops.port)
    page = browser.get(f"/steps/{prep}")
    assert complete_form(page, prep)
    assert 'name="result"' in page.body
    expected = ops.dry_run(
        lambda conn: complete_step(conn, prep, {"n": 3}, operator="x", now=utcnow())
    )
    assert isinstance(expected, OperatorReport)
    form = {"operator": "bo", "result": '{"n": 3}', "reason": "done by phone"}
    reply = browser.post(f"/steps/{prep}/complete", form)
    assert reply.header("Location") == f"/steps/{prep}"
    assert flash_after(browser, reply) == expected.summary
    assert ops.step(task, "prep").results == {"n": 3}
    assert ops.states(task)["confirm"] == "waiting"
    assert ops.last_transition(prep) == (
        "complete",
        "operator:bo (dashboard)",
        "completed by operator: done by phone",
    )
    assert not complete_form(browser.get(f"/steps/{prep}"), prep)
    # The wait is completable too: completing it by hand enqueues after, and wakes workers.
    confirm = ops.step(task, "confirm").step_uuid
    assert complete_form(browser.get(f"/steps/{confirm}"), confirm)
    drained(wake_socket)
    reply = browser.post(f"/steps/{confirm}/complete", {"operator": "bo", "result": "{}"})
    assert "enqueued after" in flash_after(browser, reply)
    assert wake_socket.recv(100) == b""  # any namespace, as resolve and retry send
    with pytest.raises(BlockingIOError):
        wake_socket.recv(100)


def test_complete_refuses_a_running_step_and_bad_results(ops: Site) -> None:
    task = ops.submit()
    ops.claim(task, "prep")
    prep = ops.step(task, "prep").step_uuid
    browser = ops.browser(task)
    assert not complete_form(browser.get(f"/steps/{prep}"), prep)
    expected = ops.dry_run(lambda conn: complete_step(conn, prep, {}, operator="x", now=utcnow()))
    assert isinstance(expected, TransitionError)
    written = ops.written()
    reply = browser.post(f"/steps/{prep}/complete", {"operator": "bo", "result": "{}"})
    assert assert_error_page(reply, 409) == str(expected)
    for result, message in (
        ("[1, 2]", "result: a JSON object is needed"),
        ("{", "result: not JSON"),
    ):
        reply = browser.post(f"/steps/{prep}/complete", {"operator": "bo", "result": result})
        assert assert_error_page(reply, 400).startswith(message)
    reply = browser.post(f"/steps/{prep}/complete", {"operator": "bo", "result": "{}"}, csrf=None)
    assert_error_page(reply, 403, "form token")
    assert ops.written() == written
    assert ops.states(task)["prep"] == "in_progress"


# --- with a login ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    db = sqlite_database(tmp_path_factory.mktemp("locked") / "locked.db")
    try:
        with serving(make_settings(str(db.url), dashboard={"token": TOKEN}), db) as port:
            yield Site(db, port)
    finally:
        db.dispose()


def test_with_a_token_the_forms_need_a_login_and_record_its_name(locked: Site) -> None:
    task = locked.waiting()
    confirm = locked.step(task, "confirm").step_uuid
    prep = locked.step(task, "prep").step_uuid
    browser = Browser(locked.port)
    browser.get("/login")  # a csrf token, but no session
    written = locked.written()
    for path, form in (
        (f"/steps/{confirm}/signal", {"operator": "ann", "payload": "{}"}),
        (f"/steps/{prep}/complete", {"operator": "ann", "result": "{}"}),
    ):
        assert_error_page(browser.post(path, form), 401, "log in first")
    assert locked.written() == written

    assert login(browser, "alice", TOKEN, f"/tasks/{task}").status == 303
    page = browser.get(f"/tasks/{task}")
    assert signal_forms(page) == [confirm]
    assert 'name="operator"' not in page.body  # the name comes from the login
    reply = browser.post(f"/steps/{confirm}/signal", {"operator": "mallory", "payload": "{}"})
    assert reply.status == 303
    assert locked.last_transition(confirm)[:2] == ("complete", "operator:alice (dashboard)")
    with locked.db.read() as conn:
        sent_by = conn.execute(
            select(step_signals.c.sent_by).where(step_signals.c.task_uuid == task)
        ).scalar_one()
    assert sent_by == "operator:alice (dashboard)"
