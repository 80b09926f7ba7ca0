"""Decisions and batches applied by the commit that stores their result, on both databases:
what is skipped, what is created, and what becomes ready, all in that one transaction."""

from __future__ import annotations

import random

from duplex.clock import utcnow
from duplex.dynamic.directives import Batch, Decision, Directive, read_return_value
from duplex.messages import ClaimedStep, StepOutcome
from duplex.storage.db import Database
from duplex.storage.results import CommitReport, commit_outcomes
from tests.storage.support import POLICY, Flow

ORDER = """
name = "ops"
[[steps]]
name = "choose"
kind = "decision"
handler = "t.choose"
branches = ["express", "standard"]
[[steps]]
name = "express"
handler = "t.h"
depends_on = ["choose"]
[[steps]]
name = "express_label"
handler = "t.h"
depends_on = ["express"]
[[steps]]
name = "standard"
handler = "t.h"
depends_on = ["choose"]
[[steps]]
name = "ship"
handler = "t.h"
depends_on = ["express_label", "standard"]
"""

LINES = """
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
max_attempts = 5
inputs = { currency = "EUR" }
[[steps]]
name = "total"
handler = "t.total"
depends_on = ["line"]
"""


def directed(step: ClaimedStep, value: object) -> StepOutcome:
    """The outcome a decision or batch handler returning ``value`` produces."""
    directive = read_return_value(value, step.kind, step.spec, max_batch_items=1000)
    assert isinstance(directive, Directive), directive
    now = utcnow()
    return StepOutcome(
        step, now, now, result=directive.result, branches=directive.branches, items=directive.items
    )


def commit(db: Database, outcome: StepOutcome) -> CommitReport:
    now = utcnow()
    with db.write() as conn:
        return commit_outcomes(conn, [outcome], policy=POLICY, now=now, rng=random.Random(0))


def test_a_decision_skips_the_branch_not_taken_and_what_only_it_leads_to(db: Database) -> None:
    flow = Flow(db, ORDER)
    (choose,) = flow.claim("choose")

    report = commit(db, directed(choose, Decision(["standard"])))

    assert flow.states() == {
        "choose": "complete",
        "express": "skipped",
        "express_label": "skipped",
        "standard": "enqueued",
        "ship": "pending",
    }
    assert [r.step_uuid for r in report.ready] == [flow.uuid_of("standard")]
    assert flow.transitions("express")[-1].reason == "not chosen by decision choose"
    assert "every dependency skipped" in flow.transitions("express_label")[-1].reason
    (standard,) = flow.claim("standard")
    flow.run(standard)
    # The convergence runs with the branch that ran, and knows which one was skipped.
    (ship,) = flow.claim("ship")
    assert set(ship.dependency_results) == {"standard"}
    assert ship.skipped_dependencies == ("express_label",)
    flow.run(ship)
    assert flow.task_row().state == "complete"


def test_a_decision_that_takes_no_branch_skips_every_step_after_it(db: Database) -> None:
    flow = Flow(db, ORDER)
    (choose,) = flow.claim("choose")

    commit(db, directed(choose, Decision([])))

    assert set(flow.states().values()) == {"complete", "skipped"}
    assert flow.states()["ship"] == "skipped"
    assert flow.task_row().state == "complete"


def test_a_batch_creates_one_ready_item_per_item_and_the_convergence_waits(db: Database) -> None:
    flow = Flow(db, LINES)
    (split,) = flow.claim("split")

    report = commit(db, directed(split, Batch([{"sku": "a"}, {"sku": "b"}, {"sku": "c"}])))

    states = flow.states()
    assert states == {
        "split": "complete",
        "line[0]": "enqueued",
        "line[1]": "enqueued",
        "line[2]": "enqueued",
        "total": "pending",
    }
    assert len(report.ready) == 3
    assert flow.step("split").results == {"items": 3}
    item = flow.step("line[1]")
    assert (item.inputs, item.max_attempts, item.item_index) == (
        {"currency": "EUR", "item": {"sku": "b"}},
        5,
        1,
    )
    lines = flow.claim("line[0]", "line[1]", "line[2]")
    for line in lines[:2]:
        flow.run(line)
    flow.claim()  # the convergence waits for the last item
    flow.run(lines[2])
    (total,) = flow.claim("total")
    # The items' results are read page by page, not with the claim.
    assert set(total.dependency_results) == {"split"}


def test_a_batch_of_no_items_lets_the_convergence_run_at_once(db: Database) -> None:
    flow = Flow(db, LINES)
    (split,) = flow.claim("split")

    commit(db, directed(split, Batch([])))

    assert flow.states() == {"split": "complete", "total": "enqueued"}


def test_a_failed_batch_creates_nothing(db: Database) -> None:
    flow = Flow(db, LINES)
    (split,) = flow.claim("split")

    flow.run(split, "permanent")

    assert flow.states() == {"split": "error", "total": "pending"}
