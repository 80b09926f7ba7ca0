"""The dashboard of a dynamic task: a batch's items are one row and one graph node with their
counts per state, listed 100 a page on their own page (keyset on ``item_index``); a skipped
step is marked with the decision that skipped it; a waiting step says what it waits for; the
task list counts a skipped step as done (``duplex.dashboard.pages``, ``batch_view``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from duplex.clock import utcnow
from duplex.dynamic.directives import Batch, Decision
from duplex.storage.batch_view import TIMES, batch_groups, item_page
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from tests.cli.test_cli_status_dynamic import ORDER, directed
from tests.conftest import make_settings, sqlite_database
from tests.dashboard.support import Browser, serving
from tests.storage.support import Flow

ITEMS = 250


@dataclass
class Shop:
    flow: Flow
    browser: Browser

    def uuid(self, name: str) -> str:
        return self.flow.uuid_of(name)


def make_shop(db: Database) -> Flow:
    """An order of 250 lines (three complete, one failed, one running, the rest queued) that
    chose standard shipping; its warehouse wait and its sleep in progress."""
    flow = Flow(db, ORDER)
    choose, split = sorted(flow.claim("choose", "split"), key=lambda s: s.name)
    directed(flow, split, Batch([{"sku": n} for n in range(ITEMS)]))
    with db.write() as conn:
        lines = claim_ready_steps(
            conn, worker_id="w1", namespaces=[flow.namespace], limit=5, now=utcnow()
        )
    for line in lines[:3]:
        flow.run(line)
    flow.run(lines[3], "permanent")
    directed(flow, choose, Decision(["standard"]))
    return flow


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    db = sqlite_database(tmp_path_factory.mktemp("dynamic") / "d.db")
    flow = make_shop(db)
    with serving(make_settings(str(db.url)), db) as port:
        yield Shop(flow, Browser(port))
    db.dispose()


def test_task_page_groups_the_items_and_marks_skipped_and_waiting_steps(shop: Shop) -> None:
    reply = shop.browser.get(f"/tasks/{shop.flow.task}")
    assert reply.status == 200
    body = reply.body

    # No item is rendered one by one, in the graph, the timeline or the steps table (the
    # domain events below them may name some: they are the first 200 events).
    assert "line[" not in body[: body.index("<h2>Context</h2>")]
    group = re.search(r'<tr class="batch-items".*?</tr>', body, re.S)
    assert group is not None
    row = group.group(0)
    assert f"line {TIMES} {ITEMS}" in row
    for state, n in (("complete", 3), ("in progress", 1), ("error", 1), ("enqueued", 245)):
        assert f"{state}</span>&nbsp;{n}" in row
    assert f'href="/steps/{shop.uuid("split")}/items"' in row
    # One graph node per step, and one for all the items, linking to their pages.
    assert body.count('<g class="node') == 8
    assert f'<a href="/steps/{shop.uuid("split")}/items"><g class="node state-error"' in body

    skipped = re.search(
        rf'<tr data-step="{shop.uuid("express")}" class="skipped">.*?</tr>', body, re.S
    )
    assert skipped is not None
    assert "not chosen by decision choose" in skipped.group(0)
    waiting = re.search(
        rf'<tr data-step="{shop.uuid("confirm")}" class="waiting">.*?</tr>', body, re.S
    )
    assert waiting is not None
    assert "waiting for signal warehouse_confirmed until 20" in waiting.group(0)
    assert "sleeping until 20" in body


def test_items_are_listed_a_hundred_a_page(shop: Shop) -> None:
    split = shop.uuid("split")
    first = shop.browser.get(f"/steps/{split}/items")
    assert first.status == 200
    assert re.findall(r'data-item="(\d+)"', first.body) == [str(i) for i in range(100)]
    assert f'rel="next" href="/steps/{split}/items?from=100"' in first.body
    assert 'rel="prev"' not in first.body

    last = shop.browser.get(f"/steps/{split}/items?from=200")
    assert re.findall(r'data-item="(\d+)"', last.body) == [str(i) for i in range(200, ITEMS)]
    assert 'rel="next"' not in last.body
    assert f'rel="prev" href="/steps/{split}/items?from=100"' in last.body


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/steps/{split}/items?from=x", 400, "from: not an item number: 'x'"),
        ("/steps/{standard}/items", 400, "step standard is not a batch step: it has no items"),
    ],
)
def test_bad_item_pages_are_clear_errors(shop: Shop, path: str, status: int, message: str) -> None:
    reply = shop.browser.get(path.format(split=shop.uuid("split"), standard=shop.uuid("standard")))
    assert (reply.status, reply.message) == (status, message)


def test_task_list_counts_a_skipped_step_as_done(shop: Shop) -> None:
    body = shop.browser.get("/tasks").body
    row = re.search(rf'<tr data-task="{shop.flow.task}">.*?</tr>', body, re.S)
    assert row is not None
    # choose, split and three lines complete, express skipped: 6 of 7 steps and 250 items.
    assert f'value="6"></progress> 6/{7 + ITEMS}' in row.group(0)


def test_item_pages_and_counts_come_from_sql_on_both_databases(db: Database) -> None:
    flow = make_shop(db)
    with db.read() as conn:
        (group,) = batch_groups(conn, flow.task)
        assert group.counts == {"complete": 3, "in_progress": 1, "error": 1, "enqueued": 245}
        page = item_page(conn, flow.task, group, start=240, limit=100)
    assert [r.item_index for r in page.rows] == list(range(240, ITEMS))
    assert [r.name for r in page.rows[:2]] == ["line[240]", "line[241]"]
    assert not page.more
