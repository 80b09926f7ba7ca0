"""``duplex status TASK`` of a dynamic task: a batch's items are one line of counts (counted
in SQL, listed only with ``--items``), a skipped step names the decision that skipped it, a
waiting step says what it waits for and until when (``duplex.cli.tasks``, ``batch_view``)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from duplex.cli.tasks import cmd_status
from duplex.clock import utcnow
from duplex.dynamic.directives import Batch, Decision, Directive, read_return_value
from duplex.messages import ClaimedStep, StepOutcome
from duplex.settings import Settings
from duplex.storage.batch_view import TIMES
from duplex.storage.results import commit_outcomes
from tests.conftest import make_settings, sqlite_database
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
name = "standard"
handler = "t.h"
depends_on = ["choose"]
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
name = "total"
handler = "t.total"
depends_on = ["line"]
[[steps]]
name = "confirm"
kind = "wait"
signal = "warehouse_confirmed"
timeout_ms = 3600000
[[steps]]
name = "nap"
kind = "sleep"
duration = "5m"
"""


def directed(flow: Flow, step: ClaimedStep, value: object) -> None:
    """Commit what a decision or batch handler returning ``value`` produces."""
    directive = read_return_value(value, step.kind, step.spec, max_batch_items=1000)
    assert isinstance(directive, Directive), directive
    now = utcnow()
    outcome = StepOutcome(
        step, now, now, result=directive.result, branches=directive.branches, items=directive.items
    )
    with flow.db.write() as conn:
        commit_outcomes(conn, [outcome], policy=POLICY, now=now, rng=random.Random(0))


@pytest.fixture
def shop(tmp_path: Path) -> tuple[Settings, str]:
    """An order that chose standard shipping, with five lines: three complete, one failed,
    one running; a wait and a sleep in progress."""
    db = sqlite_database(tmp_path / "d.db")
    flow = Flow(db, ORDER)
    choose, split = sorted(flow.claim("choose", "split"), key=lambda s: s.name)
    directed(flow, choose, Decision(["standard"]))
    directed(flow, split, Batch([{"sku": n} for n in range(5)]))
    claimed = sorted(
        flow.claim("standard", *(f"line[{i}]" for i in range(5))), key=lambda s: s.name
    )
    lines = [s for s in claimed if s.name.startswith("line")]
    for line in lines[:3]:
        flow.run(line)
    flow.run(lines[3], "permanent")
    db.dispose()
    return make_settings(f"sqlite:///{tmp_path / 'd.db'}"), flow.task


def status(settings: Settings, task: str, capsys: pytest.CaptureFixture[str], **flags: bool) -> str:
    args = argparse.Namespace(
        task_uuid=task,
        json=flags.get("json", False),
        items=flags.get("items", False),
        limit=50,
        watch=False,
        interval=1.0,
    )
    assert cmd_status(args, settings) == 0
    return capsys.readouterr().out


def test_status_shows_a_batch_as_one_line_and_says_why_steps_skip_or_wait(
    shop: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, task = shop
    out = status(settings, task, capsys)
    lines = out.splitlines()

    (group,) = [line for line in lines if f"line {TIMES} 5" in line]
    assert "3 complete, 1 running, 1 error" in group
    assert "line[" not in out
    (express,) = [line for line in lines if line.startswith("express")]
    assert "skipped" in express
    assert "not chosen by decision choose" in express
    (confirm,) = [line for line in lines if line.startswith("confirm")]
    assert "waiting for signal warehouse_confirmed until 20" in confirm
    (nap,) = [line for line in lines if line.startswith("nap")]
    assert "sleeping until 20" in nap
    assert "1 skipped, 2 waiting" in lines[1]

    # --items lists each item after the group line, in item order.
    listed = status(settings, task, capsys, items=True)
    assert [line.split()[0] for line in listed.splitlines() if line.startswith("  line[")] == [
        f"line[{i}]" for i in range(5)
    ]


def test_status_json_gives_batch_counts_and_items_only_when_asked(
    shop: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, task = shop
    data = json.loads(status(settings, task, capsys, json=True))

    assert data["batches"] == [
        {
            "batch": "split",
            "batch_uuid": data["batches"][0]["batch_uuid"],
            "worker": "line",
            "items": 5,
            "done": 3,
            "states": {"complete": 3, "in_progress": 1, "error": 1},
        }
    ]
    steps = {s["name"]: s for s in data["steps"]}
    assert set(steps) == {"choose", "express", "standard", "split", "total", "confirm", "nap"}
    assert (steps["express"]["state"], steps["express"]["skipped_by"]) == ("skipped", "choose")
    assert steps["confirm"]["note"].startswith("waiting for signal warehouse_confirmed until ")
    assert steps["confirm"]["next_attempt_at"] is not None
    assert (data["skipped_steps"], data["waiting_steps"]) == (1, 2)

    detailed = json.loads(status(settings, task, capsys, json=True, items=True))
    items = detailed["batches"][0]["item_steps"]
    assert [(i["name"], i["item_index"]) for i in items] == [(f"line[{i}]", i) for i in range(5)]
    assert items[3]["error_type"] == "permanent_error"
