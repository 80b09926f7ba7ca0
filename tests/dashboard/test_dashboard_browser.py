"""The dashboard in a real browser: Chromium (Debian's, driven by Playwright) against a real
``duplex dashboard`` and a real ``duplex run`` worker, both subprocesses on one SQLite file.

Workflows come from ``tests/e2e_templates/browser_*.toml``; their handlers
(``tests/e2e_handlers/browser.py``) hold a step at a gate file until the test opens it, so a
test sees a page before the work it waits for has happened, without timing guesses. Every
wait is for a condition with a deadline. A page's "no reload" is checked with a marker set on
``window`` after load, which a reload would wipe. Each test fails on any console error, page
error or CSP violation in the browser. Screenshots of the main pages go to
``$DUPLEX_ARTIFACTS`` or ``build/screenshots/``.

Nothing is downloaded: Playwright drives ``/usr/bin/chromium``. Without that binary the
tests skip, except under ``CI`` where they fail.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from duplex.storage.operations import OperatorReport, StepChange
from tests import processes
from tests.cli.support import (
    HANDLER_MODULE,
    REPO_ROOT,
    TEMPLATES,
    Duplex,
    make_duplex,
    migrated_file,
    wait_for,
)

try:
    from playwright.sync_api import (
        Browser,
        BrowserContext,
        ConsoleMessage,
        Page,
        expect,
        sync_playwright,
    )
    from playwright.sync_api import Error as PlaywrightError
except ImportError:  # pragma: no cover - checked by require_chromium
    PLAYWRIGHT_MISSING = True
else:
    PLAYWRIGHT_MISSING = False

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_MODULE = "tests.e2e_handlers.browser"
GATES_ENV = "BROWSER_GATES"
SERVING = re.compile(r"serving http://127\.0\.0\.1:(\d+)/ \(dashboard\)")
# Deadline for any condition seen in the browser (ms) or in the database (s).
WAIT_MS = 30_000
WAIT_S = 30.0
EXIT_TIMEOUT_S = 30.0
OPERATOR = "alice"

FLOW_STEPS = ("gate", "fetch", "left", "right", "flaky", "report")


def require_chromium() -> None:
    """Skip without Chromium or Playwright, except in CI where that is a failure."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if PLAYWRIGHT_MISSING:
        missing.append("the playwright package")
    if not missing:
        return
    message = f"the browser tests need {' and '.join(missing)}"
    if os.environ.get("CI"):
        pytest.fail(f"{message}, required in CI")
    pytest.skip(message)


def artifacts_dir() -> Path:
    directory = Path(os.environ.get("DUPLEX_ARTIFACTS") or REPO_ROOT / "build" / "screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def screenshot(page: Page, name: str) -> None:
    path = artifacts_dir() / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000, f"screenshot {path} is empty"


# --- the processes --------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(EXIT_TIMEOUT_S)


def start(duplex: Duplex, name: str, *args: str) -> Process:
    """Start a long-lived ``duplex`` command, its output in files of its own."""
    log = duplex.cwd / f"{name}.log"
    with open(log, "wb") as out:
        popen = processes.current().popen(
            duplex.command(args),
            cwd=duplex.cwd,
            env=duplex.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Process(name, popen, log)


@dataclass
class Stack:
    """A migrated database, a worker and a dashboard over it, and the gates of the workflows."""

    duplex: Duplex
    worker: Process
    dashboard: Process
    base_url: str
    gates: Path
    opened: set[str] = field(default_factory=set)
    used: set[str] = field(default_factory=set)

    def submit(self, template: str, **gates: str) -> str:
        """Submit a task whose context names its gates (``gate``, ``retry_gate``)."""
        self.used.update(gates.values())
        return self.duplex.submit(TEMPLATES / template, dict(gates))

    def release(self, gate: str) -> None:
        (self.gates / gate).touch()
        self.opened.add(gate)

    def steps(self, task_uuid: str) -> dict[str, str]:
        """Return ``name -> step_uuid`` of a task's steps."""
        rows = self.duplex.sql(
            "SELECT name, step_uuid FROM workflow_steps WHERE task_uuid = ?", [task_uuid]
        )
        return dict(rows)

    def task_state(self, task_uuid: str) -> str:
        rows = self.duplex.sql("SELECT state FROM tasks WHERE task_uuid = ?", [task_uuid])
        return str(rows[0][0])

    def assert_running(self) -> None:
        for process in (self.worker, self.dashboard):
            assert process.popen.poll() is None, (
                f"{process.name} exited ({process.popen.returncode}):\n{process.text()}"
            )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_chromium()
    duplex = make_duplex(
        tmp_path_factory.mktemp("dashboard-browser"),
        handler_modules=(HANDLER_MODULE, BROWSER_MODULE),
    )
    settings = duplex.cwd / "settings.toml"
    settings.write_text(settings.read_text() + "\n[dashboard]\nrefresh_ms = 200\n")
    migrated_file(duplex)
    gates = duplex.cwd / "gates"
    gates.mkdir()
    duplex.env[GATES_ENV] = str(gates)

    processes: list[Process] = []
    stack: Stack | None = None
    try:
        processes.append(start(duplex, "dashboard", "dashboard", "--port", "0"))
        processes.append(start(duplex, "worker", "run"))
        dashboard, worker = processes
        found: list[int] = []

        def serving() -> bool:
            assert dashboard.popen.poll() is None, f"dashboard exited:\n{dashboard.text()}"
            match = SERVING.search(dashboard.text())
            if match:
                found.append(int(match.group(1)))
            return bool(found)

        wait_for(serving, "the dashboard's port")
        stack = Stack(duplex, worker, dashboard, f"http://127.0.0.1:{found[0]}", gates)
        yield stack
    finally:
        # Open every gate first, so that the worker's held steps end and it stops at once.
        for gate in stack.used if stack is not None else ():
            (gates / gate).touch()
        for process in reversed(processes):
            process.stop()


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


# Reported as a console error by any CSP violation, whatever the browser logs on its own.
CSP_WATCH = """
document.addEventListener("securitypolicyviolation", (event) => {
  console.error("CSP violation: " + event.violatedDirective + " " + event.blockedURI);
});
"""


class Session:
    """One browser context (its own cookies) whose pages' errors are all collected."""

    def __init__(self, context: BrowserContext, base_url: str) -> None:
        self.context = context
        self.base_url = base_url
        self.errors: list[tuple[Page, str]] = []
        self.allowed: dict[int, re.Pattern[str]] = {}
        context.add_init_script(CSP_WATCH)

    def open(self, path: str) -> Page:
        page = self.context.new_page()
        page.set_default_timeout(WAIT_MS)

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                self.errors.append((page, f"console error on {page.url}: {message.text}"))

        def on_page_error(error: PlaywrightError) -> None:
            self.errors.append((page, f"page error on {page.url}: {error}"))

        page.on("console", on_console)
        page.on("pageerror", on_page_error)
        page.goto(self.base_url + path)
        mark(page)
        return page

    def allow(self, page: Page, pattern: str) -> None:
        """Tolerate console errors matching ``pattern`` on ``page`` (an expected error page)."""
        self.allowed[id(page)] = re.compile(pattern)

    def unexpected_errors(self) -> list[str]:
        out = []
        for page, text in self.errors:
            allowed = self.allowed.get(id(page))
            if allowed is None or not allowed.search(text):
                out.append(text)
        return out

    def assert_clean(self) -> None:
        errors = self.unexpected_errors()
        assert not errors, "the browser reported errors:\n" + "\n".join(errors)


@pytest.fixture
def session(stack: Stack, browser: Browser) -> Iterator[Session]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        yield Session(context, stack.base_url)
    finally:
        context.close()
        stack.assert_running()


def mark(page: Page) -> None:
    """Set a marker on ``window`` that only a reload or navigation would remove."""
    page.evaluate("window.__marker = 1")


def assert_not_reloaded(page: Page) -> None:
    assert page.evaluate("window.__marker") == 1, "the page reloaded: the live refresh did not"


def node_states(page: Page) -> dict[str, str]:
    """Return ``step_uuid -> data-state`` of every node of the task page's DAG."""
    states: dict[str, str] = page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll("svg.dag g.node")]
             .map((n) => [n.dataset.step, n.dataset.state]))"""
    )
    return states


def wait_for_nodes(page: Page, want: dict[str, str]) -> None:
    """Wait until each named node of the DAG is in the wanted state (step_uuid -> state)."""
    try:
        page.wait_for_function(
            """(want) => Object.entries(want).every(([step, state]) => {
                 const node = document.querySelector(`svg.dag g.node[data-step="${step}"]`);
                 return node !== null && node.dataset.state === state
                   && node.classList.contains("state-" + state);
               })""",
            arg=want,
            timeout=WAIT_MS,
        )
    except PlaywrightError as exc:
        raise AssertionError(f"DAG never reached {want}; it shows {node_states(page)}") from exc


def act(page: Page, action: str, reason: str) -> None:
    """Fill the form of ``action`` (cancel, retry, resolve) and submit it."""
    form = page.locator("form.action", has=page.locator(f'button[value="{action}"]'))
    form.locator('input[name="operator"]').fill(OPERATOR)
    form.locator('input[name="reason"]').fill(reason)
    with page.expect_navigation():
        form.locator(f'button[value="{action}"]').click()


def flash(page: Page) -> str:
    return page.locator("p.flash").inner_text().strip()


# --- the tests ------------------------------------------------------------------------------


def test_console_watch_catches_a_csp_violation(stack: Stack, session: Session) -> None:
    """The error watch of the other tests works: an inline script is refused and reported."""
    page = session.open("/tasks")
    page.evaluate(
        """() => { const s = document.createElement("script");
                   s.textContent = "window.__inline = 1"; document.head.append(s); }"""
    )
    wait_for(lambda: bool(session.unexpected_errors()), "the CSP violation to be reported")
    assert page.evaluate("window.__inline") is None
    assert any("CSP violation" in e for e in session.unexpected_errors())


def test_task_appears_and_its_dag_fills_in_live(stack: Stack, session: Session) -> None:
    page = session.open("/tasks")
    task = stack.submit("browser_flow.toml", gate="live")

    # The task appears in the list without a reload.
    row = page.locator(f'tr[data-task="{task}"]')
    expect(row).to_be_visible()
    expect(row).to_contain_text("e2e_browser_flow")
    assert_not_reloaded(page)
    screenshot(page, "tasks.png")

    with page.expect_navigation():
        row.locator(f'a[href="/tasks/{task}"]').click()
    mark(page)
    steps = stack.steps(task)
    assert sorted(steps) == sorted(FLOW_STEPS)
    nodes = page.locator("svg.dag g.node")
    expect(nodes).to_have_count(len(FLOW_STEPS))
    # Held at the gate: nothing has finished yet.
    before = node_states(page)
    assert set(before) == set(steps.values())
    assert before[steps["gate"]] in ("enqueued", "in_progress"), before
    assert all(before[steps[name]] == "pending" for name in FLOW_STEPS[1:]), before

    stack.release("live")
    wait_for_nodes(
        page,
        {
            **{steps[name]: "complete" for name in ("gate", "fetch", "left", "right")},
            steps["flaky"]: "error",
            steps["report"]: "pending",
        },
    )
    # One timeline bar per attempt: five steps ran once each, report never ran.
    expect(page.locator("svg.lane-bars rect.bar")).to_have_count(5)
    wait_for(lambda: stack.task_state(task) == "error", "the task to end in error")
    expect(page.locator("#task-state")).to_have_text("error")
    assert_not_reloaded(page)
    screenshot(page, "task.png")
    session.assert_clean()


def test_retry_runs_the_failed_step_again(stack: Stack, session: Session) -> None:
    task = stack.submit("browser_flow.toml", retry_gate="retry")
    steps = stack.steps(task)
    flaky = steps["flaky"]

    page = session.open(f"/steps/{flaky}")
    # The step fails while the page is open; its retry form arrives with the live refresh.
    retry = page.locator('form.action button[value="retry"]')
    expect(retry).to_be_visible()
    expect(page.locator("#step-state")).to_have_text("error")
    expect(page.locator("tr.attempt")).to_have_count(1)
    expect(page.locator('tr.attempt[data-attempt="1"]')).to_have_attribute("data-outcome", "error")

    # A second tab with the same form, typed into: the refresh leaves it alone.
    other = session.open(f"/steps/{flaky}")
    other_form = other.locator("form.action", has=other.locator('button[value="retry"]'))
    other_form.locator('input[name="operator"]').fill(OPERATOR)
    other_form.locator('input[name="reason"]').fill("second click")

    act(page, "retry", "flaky on purpose")
    mark(page)
    expected = OperatorReport(
        "retry", task, "in_progress", (StepChange(flaky, "flaky", "error", "enqueued"),)
    ).summary
    assert flash(page) == expected
    # The new attempt shows up live, held at its gate, then succeeds.
    second = page.locator('tr.attempt[data-attempt="2"]')
    expect(second).to_have_attribute("data-outcome", "running")
    expect(page.locator("#step-state")).to_have_text("in progress")
    stack.release("retry")
    expect(second).to_have_attribute("data-outcome", "complete")
    expect(page.locator("tr.attempt")).to_have_count(2)
    expect(page.locator("#step-state")).to_have_text("complete")
    expect(page.locator("form.action")).to_have_count(0)
    assert_not_reloaded(page)
    wait_for(lambda: stack.task_state(task) == "complete", "the retried task to complete")
    screenshot(page, "step.png")

    # The operator and the reason are in the history.
    [(who, why)] = stack.duplex.sql(
        "SELECT worker_id, reason FROM workflow_step_transitions "
        "WHERE step_uuid = ? AND from_state = 'error' AND to_state = 'enqueued'",
        [flaky],
    )
    assert who == f"operator:{OPERATOR} (dashboard)"
    assert why == "retried by operator: flaky on purpose (max_attempts raised to 2)"

    # The same form posted again from the second tab: refused as the CLI refuses it.
    assert other_form.locator('input[name="reason"]').input_value() == "second click"
    session.allow(other, r"status of 409")
    with other.expect_navigation() as navigation:
        other_form.locator('button[value="retry"]').click()
    answer = navigation.value
    assert answer is not None
    assert answer.status == 409
    message = other.locator("p.error-message").inner_text().strip()
    cli = stack.duplex.run("retry", flaky)
    assert cli.returncode != 0
    assert cli.stderr == f"duplex: error: {message}\n"
    assert "only a step in error or cancelled can be retried" in message
    screenshot(other, "conflict.png")
    # Nothing was written by the refused moves: still two attempts, one operator retry.
    assert stack.duplex.sql(
        "SELECT COUNT(*) FROM workflow_step_transitions WHERE step_uuid = ? AND to_state = ?",
        [flaky, "enqueued"],
    ) == [(2,)]  # made ready once, retried once
    session.assert_clean()


def test_cancel_a_running_task_from_its_page(stack: Stack, session: Session) -> None:
    task = stack.submit("browser_hold.toml", gate="cancel")
    steps = stack.steps(task)
    page = session.open(f"/tasks/{task}")
    wait_for_nodes(page, {steps["hold"]: "in_progress"})

    act(page, "cancel", "no longer needed")
    mark(page)
    # What `duplex cancel` prints: the two steps not yet running are cancelled.
    expected = OperatorReport(
        "cancel",
        task,
        "cancelled",
        tuple(StepChange(steps[name], name, "pending", "cancelled") for name in ("after", "final")),
        still_running=1,
    ).summary
    assert flash(page) == expected
    expect(page.locator("#task-state")).to_have_text("cancelled")
    expect(page.locator('form.action button[value="cancel"]')).to_have_count(0)

    # The running step is stopped too, by its worker's next sweep, and nothing runs after it.
    wait_for_nodes(
        page,
        {steps["hold"]: "cancelled", steps["after"]: "cancelled", steps["final"]: "cancelled"},
    )
    stack.release("cancel")  # the abandoned handler may now return: its result is refused
    expect(page.locator("#task-state")).to_have_text("cancelled")
    assert_not_reloaded(page)
    assert stack.task_state(task) == "cancelled"
    ran = stack.duplex.runs()
    assert ran[steps["after"]] == 0
    assert ran[steps["final"]] == 0
    session.assert_clean()


def test_resolve_a_failed_step_unblocks_its_dependents(stack: Stack, session: Session) -> None:
    task = stack.submit("browser_broken.toml")
    steps = stack.steps(task)
    broken = steps["broken"]
    page = session.open(f"/steps/{broken}")
    expect(page.locator('form.action button[value="resolve"]')).to_be_visible()
    expect(page.locator("#step-state")).to_have_text("error")

    act(page, "resolve", "fixed by hand")
    # What `duplex resolve` prints; the two children are enqueued in either order.
    expected = {
        OperatorReport(
            "resolve",
            task,
            "in_progress",
            (
                StepChange(broken, "broken", "error", "resolved_manually"),
                *(StepChange(steps[name], name, "pending", "enqueued") for name in order),
            ),
        ).summary
        for order in (("d1", "d2"), ("d2", "d1"))
    }
    assert flash(page) in expected
    expect(page.locator("#step-state")).to_have_text("resolved manually")

    with page.expect_navigation():
        page.locator(f'p.crumbs a[href="/tasks/{task}"]').click()
    mark(page)
    wait_for_nodes(
        page,
        {
            broken: "resolved_manually",
            **{steps[name]: "complete" for name in ("d1", "d2", "d3")},
        },
    )
    expect(page.locator("#task-state")).to_have_text("complete")
    assert_not_reloaded(page)
    assert stack.task_state(task) == "complete"
    session.assert_clean()


def test_workers_page_shows_the_running_worker(stack: Stack, session: Session) -> None:
    pid = stack.worker.popen.pid
    query = "SELECT worker_id FROM workers WHERE pid = ?"
    wait_for(lambda: bool(stack.duplex.sql(query, [pid])), "the worker to register")
    worker_id = stack.duplex.sql(query, [pid])[0][0]
    page = session.open("/workers")
    row = page.locator(f'tr[data-worker="{worker_id}"]')
    expect(row).to_have_class(re.compile(r"\balive\b"))
    expect(row).to_contain_text(str(stack.worker.popen.pid))
    screenshot(page, "workers.png")
    session.assert_clean()
