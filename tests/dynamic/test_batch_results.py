"""A convergence reads its batch's results page by page, in item order, on both databases: only
its own batch's items (two batches in one task), and never more than a page at a time."""

from __future__ import annotations

import random
from typing import Any

import pytest
from sqlalchemy import bindparam, update

from duplex.clock import utcnow
from duplex.dispatch.attempt import run_attempt
from duplex.dynamic.directives import Batch, Directive, read_return_value
from duplex.handlers import BatchResult, Cancellation, HandlerRegistry, StepContext
from duplex.messages import ClaimedStep, StepOutcome
from duplex.storage.db import Database
from duplex.storage.models import workflow_steps
from duplex.storage.results import commit_outcomes
from duplex.storage.step_store import DatabaseStepStore
from tests.storage.support import POLICY, Flow

# Two batches in one task; one item step's name starts with the other's.
TWO_BATCHES = """
name = "ops"
[[steps]]
name = "split"
kind = "batch"
handler = "t.split"
worker = "line"
[[steps]]
name = "line"
handler = "t.line"
depends_on = ["split"]
[[steps]]
name = "split_more"
kind = "batch"
handler = "t.split"
worker = "line_b"
[[steps]]
name = "line_b"
handler = "t.line"
depends_on = ["split_more"]
[[steps]]
name = "total"
handler = "t.total"
depends_on = ["line", "line_b"]
"""


class CountingStore(DatabaseStepStore):
    """The real store, recording each page asked for: (after, limit, items returned)."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.pages: list[tuple[int, int, int]] = []

    def batch_results(
        self, task_uuid: str, worker: str, *, after: int, limit: int
    ) -> list[BatchResult]:
        page = super().batch_results(task_uuid, worker, after=after, limit=limit)
        self.pages.append((after, limit, len(page)))
        return page


def commit_batch(db: Database, step: ClaimedStep, count: int) -> None:
    """Commit what a batch handler returning ``count`` items produces (items created)."""
    directive = read_return_value(
        Batch([{"n": i} for i in range(count)]), step.kind, step.spec, max_batch_items=count + 1
    )
    assert isinstance(directive, Directive), directive
    now = utcnow()
    outcome = StepOutcome(step, now, now, result=directive.result, items=directive.items)
    with db.write() as conn:
        report = commit_outcomes(conn, [outcome], policy=POLICY, now=now, rng=random.Random(0))
    assert report.applied == [outcome]


def make_batches(db: Database, line: int, line_b: int) -> Flow:
    flow = Flow(db, TWO_BATCHES)
    split, split_more = sorted(flow.claim("split", "split_more"), key=lambda s: s.name)
    commit_batch(db, split, line)
    commit_batch(db, split_more, line_b)
    return flow


def test_pages_follow_item_order_and_hold_only_their_own_batch(db: Database) -> None:
    flow = make_batches(db, line=7, line_b=5)
    names = [f"line[{i}]" for i in range(7)] + [f"line_b[{i}]" for i in range(5)]
    # Items finish in any order; the pages are still in item order.
    for step in sorted(flow.claim(*names), key=lambda s: s.name, reverse=True):
        flow.run(step)
    store = DatabaseStepStore(db)

    pages = []
    after = -1
    while page := store.batch_results(flow.task, "line", after=after, limit=3):
        pages.append([(r.index, r.state, r.result) for r in page])
        after = page[-1].index

    assert pages == [
        [(i, "complete", {"from": f"line[{i}]"}) for i in (0, 1, 2)],
        [(i, "complete", {"from": f"line[{i}]"}) for i in (3, 4, 5)],
        [(6, "complete", {"from": "line[6]"})],
    ]
    other = store.batch_results(flow.task, "line_b", after=-1, limit=100)
    assert [(r.index, r.result) for r in other] == [(i, {"from": f"line_b[{i}]"}) for i in range(5)]
    # A step that is no batch's worker, or a prefix of one, has no items.
    assert store.batch_results(flow.task, "lin", after=-1, limit=100) == []
    assert store.batch_results(flow.task, "total", after=-1, limit=100) == []


def test_a_page_needs_a_positive_size(db: Database) -> None:
    flow = make_batches(db, line=1, line_b=0)
    with pytest.raises(ValueError, match="at least one item"):
        DatabaseStepStore(db).batch_results(flow.task, "line", after=-1, limit=0)


def finish_items(db: Database, task_uuid: str, count: int) -> None:
    """Complete a batch's items in one statement (running 2,000 steps is not the point here)."""
    with db.write() as conn:
        conn.execute(
            update(workflow_steps)
            .where(
                workflow_steps.c.task_uuid == task_uuid,
                workflow_steps.c.name == bindparam("b_name"),
            )
            .values(state="complete", results=bindparam("v_results")),
            [{"b_name": f"line[{i}]", "v_results": {"square": i * i}} for i in range(count)],
        )


def test_a_convergence_reads_a_large_batch_one_page_at_a_time(db: Database) -> None:
    items = 2000
    flow = make_batches(db, line=items, line_b=3)
    finish_items(db, flow.task, items)
    store = CountingStore(db)
    seen: list[BatchResult] = []
    pages_when_first_seen: list[int] = []

    def total(ctx: StepContext) -> dict[str, Any]:
        for result in ctx.batch_results("line", page_size=500):
            if not seen:
                pages_when_first_seen.append(len(store.pages))
            seen.append(result)
        return {"sum": sum(r.result["square"] for r in seen if r.result is not None)}

    registry = HandlerRegistry()
    registry.register("t.total", total)
    step = ClaimedStep(flow.uuid_of("total"), flow.task, "total", "t.total", 1, 1, True, None, "w1")
    outcome = run_attempt(
        step,
        registry,
        timeout_s=60,
        cancellation=Cancellation(),
        max_result_bytes=10_000,
        store=store,
    )

    assert outcome.failure is None, outcome.failure
    assert outcome.result == {"sum": sum(i * i for i in range(items))}
    assert [r.index for r in seen] == list(range(items))
    assert {r.state for r in seen} == {"complete"}
    # Lazily, a page at a time: the first item came from the first page alone, and each
    # page starts after the last index of the one before.
    assert pages_when_first_seen == [1]
    full = [(after, 500, 500) for after in (-1, 499, 999, 1499)]
    assert store.pages == [*full, (1999, 500, 0)]
