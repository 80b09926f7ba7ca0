"""The dashboard's words: labels that follow the task's or step's state, and times that name their
zone. Pages are served over real HTTP (``serving`` of ``tests/dashboard/support.py``) from a
SQLite database whose steps were moved with the storage functions the actors use.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from duplex.clock import utcnow
from duplex.commit.retry import RetryPolicy
from duplex.messages import StepFailure, StepOutcome
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.operations import cancel_task, resolve_step
from duplex.storage.results import commit_outcomes
from duplex.storage.submission import create_task
from duplex.templates import parse_template
from tests.conftest import make_settings, sqlite_database
from tests.dashboard.support import Browser, serving

POLICY = RetryPolicy(base_ms=60_000, multiplier=1.0, max_ms=60_000, jitter=0.0)
FACT = re.compile(r"<dt>([^<]+)</dt><dd[^>]*>(.*?)</dd>", re.S)


@dataclass
class Step:
    task: str
    step: str  # "" for a task whose step never ran


def one_step(db: Database, max_attempts: int = 1) -> tuple[str, str]:
    """Submit a task of one step in a namespace of its own; return (task_uuid, namespace)."""
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    template = parse_template(
        f'name = "one"\nnamespace = "{namespace}"\n'
        f'[[steps]]\nname = "only"\nhandler = "t.h"\nmax_attempts = {max_attempts}\n'
    )
    with db.write() as conn:
        task = create_task(conn, template, {}, now=utcnow())
    return task, namespace


def run_once(db: Database, namespace: str, failure: StepFailure | None) -> Step:
    """Claim the task's only step and commit one outcome for it."""
    with db.write() as conn:
        (claimed,) = claim_ready_steps(
            conn, worker_id="w1", namespaces=[namespace], limit=1, now=utcnow()
        )
    now = utcnow()
    outcome = (
        StepOutcome(claimed, now, now, result={"ok": True})
        if failure is None
        else StepOutcome(claimed, now, now, failure=failure)
    )
    with db.write() as conn:
        commit_outcomes(conn, [outcome], policy=POLICY, now=now, rng=random.Random(0))
    return Step(claimed.task_uuid, claimed.step_uuid)


PERMANENT = StepFailure("permanent_error", "card declined", retryable=False)
RETRYABLE = StepFailure("handler_error", "gateway busy", retryable=True)


@dataclass
class Pages:
    browser: Browser
    complete: Step
    failed: Step
    resolved: Step
    retrying: Step
    cancelled: Step
    pending: Step


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pages]:
    db = sqlite_database(tmp_path_factory.mktemp("labels") / "labels.db")
    try:
        _, ns = one_step(db)
        complete = run_once(db, ns, None)
        _, ns = one_step(db)
        failed = run_once(db, ns, PERMANENT)
        _, ns = one_step(db)
        resolved = run_once(db, ns, PERMANENT)
        with db.write() as conn:
            resolve_step(conn, resolved.step, operator="t", now=utcnow())
        _, ns = one_step(db, max_attempts=3)
        retrying = run_once(db, ns, RETRYABLE)
        cancelled_task, _ = one_step(db)
        with db.write() as conn:
            cancel_task(conn, cancelled_task, operator="t", now=utcnow())
        cancelled = Step(cancelled_task, "")
        pending = Step(one_step(db)[0], "")
        settings = make_settings(str(db.url), dashboard={"page_size": 50})
        with serving(settings, db) as port:
            yield Pages(Browser(port), complete, failed, resolved, retrying, cancelled, pending)
    finally:
        db.dispose()


def facts(body: str) -> dict[str, str]:
    return {label: re.sub(r"<[^>]+>", "", value).strip() for label, value in FACT.findall(body)}


def page(pages: Pages, path: str) -> str:
    reply = pages.browser.get(path)
    assert reply.status == 200, reply.body[:500]
    return reply.body


@pytest.mark.parametrize(
    ("which", "label"),
    [
        ("complete", "Completed"),
        ("failed", "Failed"),
        ("cancelled", "Cancelled"),
    ],
)
def test_the_task_page_names_how_the_task_finished_and_when_in_utc(
    pages: Pages, which: str, label: str
) -> None:
    task = getattr(pages, which).task
    shown = facts(page(pages, f"/tasks/{task}"))
    assert shown["Created"].endswith(" UTC")
    assert shown[label].endswith(" UTC"), shown
    others = {"Completed", "Failed", "Cancelled", "Finished"} - {label}
    assert not others & shown.keys(), shown


def test_an_unfinished_task_has_no_finish_time(pages: Pages) -> None:
    shown = facts(page(pages, f"/tasks/{pages.pending.task}"))
    assert shown["Finished"] == "—"
    assert "Completed" not in shown


def test_retryable_is_yes_or_no(pages: Pages) -> None:
    assert facts(page(pages, f"/steps/{pages.failed.step}"))["Retryable"] == "no"
    assert facts(page(pages, f"/steps/{pages.retrying.step}"))["Retryable"] == "yes"


@pytest.mark.parametrize(
    ("which", "says"),
    [
        ("failed", "No result: the step failed."),
        ("resolved", "No result: resolved by hand."),
        ("retrying", "No result yet."),
    ],
)
def test_a_step_without_a_result_says_why(pages: Pages, which: str, says: str) -> None:
    body = page(pages, f"/steps/{getattr(pages, which).step}")
    (hint,) = re.findall(r'<p class="hint" id="no-result">(.*?)</p>', body)
    assert hint == says


def test_every_time_column_names_its_zone(pages: Pages) -> None:
    headers = []
    for path in ("/tasks", f"/tasks/{pages.complete.task}", f"/steps/{pages.complete.step}"):
        headers += re.findall(r"<th>([^<]+)</th>", page(pages, path))
    timed = [
        h for h in headers if re.match(r"(Created|Claimed|Ended|Finished|Committed|Published)", h)
    ]
    assert {"Created (UTC)", "Finished (UTC)", "Claimed (UTC)", "Ended (UTC)"} <= set(timed)
    assert {"Committed (UTC)", "Published (UTC)"} <= set(timed)  # the events table
    assert all(h.endswith("(UTC)") for h in timed), timed


def test_no_python_spelling_reaches_a_page(pages: Pages) -> None:
    for step in (pages.failed, pages.retrying, pages.resolved, pages.complete):
        body = page(pages, f"/steps/{step.step}")
        text = re.sub(r"<pre[^>]*>.*?</pre>", "", body, flags=re.S)  # JSON is shown as is
        assert not re.search(r">\s*(True|False|None)\s*<", text), step
