"""The bundled example and the README's ``Client`` example, run as a user would run them.

* The order-fulfilment example runs to completion in a real worker, and the example consumer
  names the order of every event it handles, ``order.fulfilled`` (a template-declared event,
  whose payload is the ``ship`` step's result) included.
* The dynamic order example (``order_dynamic.toml``) in one real worker: an order over 100
  goes express (standard skipped), each line is packed by its own batch item and summed, and
  the task waits for the warehouse until ``duplex signal`` sends ``warehouse_confirmed``.
* The README's Python snippet for the ``Client`` runs unchanged from the checkout, with the
  bundled ``settings.toml`` (only the database is pointed elsewhere), so the story it tells
  about ``load_settings``, template names and paths holds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from duplex import Client
from duplex.events.publishing import envelope
from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.event_operations import task_events
from duplex.storage.models import tasks
from examples.consumer import handle
from tests.cli.support import ORDER_CONTEXT, REPO_ROOT, make_duplex, migrated_file, wait_for
from tests.conftest import sqlite_database

pytestmark = pytest.mark.e2e

ORDER_EVENTS = ("stock.reserved", "payment.charged", "order.shipped", "order.fulfilled")


def test_the_example_consumer_names_the_order_of_every_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    duplex = make_duplex(
        tmp_path, handler_modules=["examples.orders"], templates_dir=REPO_ROOT / "examples"
    )
    migrated_file(duplex)
    task = duplex.submit("order_fulfillment", ORDER_CONTEXT)
    run = duplex.ok("run", "--until-idle")
    assert "event order.fulfilled" in run.stdout  # the example's own subscriber saw it

    db = Database(DatabaseSettings(url=f"sqlite:///{duplex.db_path}"))
    try:
        with db.read() as conn:
            events = [e for e in task_events(conn, task) if e.name in ORDER_EVENTS]
    finally:
        db.dispose()
    assert sorted(e.name for e in events) == sorted(ORDER_EVENTS)
    capsys.readouterr()
    for event in events:
        handle(envelope(event))  # the message body the relay publishes
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(ORDER_EVENTS)
    for line in lines:
        assert re.match(rf"\S+ +order A-1001 +task {task} #\d+", line), line
    (fulfilled,) = [line for line in lines if line.startswith("order.fulfilled")]
    assert fulfilled.endswith("tracking TRACK-A-1001")


def readme_client_example() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    after = text.split("From other programs, without running a worker, use the `Client`", 1)[1]
    match = re.search(r"```python\n(.*?)```", after, re.DOTALL)
    assert match, "the README has no Client example"
    return match.group(1)


def test_the_readme_client_example_runs_with_the_bundled_settings(tmp_path: Path) -> None:
    duplex = make_duplex(tmp_path / "db")
    migrated_file(duplex)
    snippet = readme_client_example()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEX_")}
    env.update(PYTHONPATH=str(REPO_ROOT), DUPLEX_DATABASE__URL=f"sqlite:///{duplex.db_path}")
    # From the checkout, as a user who cloned it: ./settings.toml is the bundled one.
    assert (REPO_ROOT / "settings.toml").is_file()
    result = subprocess.run(
        [sys.executable, "-c", snippet + "\nprint(task_uuid, len(uuids))\n"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    task_uuid, count = result.stdout.split()
    db = Database(DatabaseSettings(url=f"sqlite:///{duplex.db_path}"))
    try:
        with db.read() as conn:
            names = conn.execute(select(tasks.c.name, func.count()).group_by(tasks.c.name)).all()
            first = conn.execute(
                select(tasks.c.context).where(tasks.c.task_uuid == task_uuid)
            ).scalar_one()
    finally:
        db.dispose()
    assert names == [("order_fulfillment", 1 + int(count))]
    assert first["order"]["id"] == "A-2001"


# Three lines worth 140 in all: over orders.EXPRESS_FROM (100), so the order travels express.
DYNAMIC_ORDER = {
    "order": {
        "id": "B-7",
        "items": [
            {"sku": "MUG", "qty": 2, "price": 40},
            {"sku": "TEA", "qty": 1, "price": 30},
            {"sku": "PEN", "qty": 3, "price": 10},
        ],
    }
}


def test_the_dynamic_order_example_goes_express_packs_each_line_and_waits_for_the_warehouse(
    tmp_path: Path,
) -> None:
    """order_dynamic.toml in one real worker: the decision skips standard shipping, the batch
    packs one step per line and pack_total sums them, the wait holds the task until
    ``duplex signal`` sends warehouse_confirmed, and dispatch reads that payload."""
    duplex = make_duplex(
        tmp_path, handler_modules=["examples.orders"], templates_dir=REPO_ROOT / "examples"
    )
    # Migrated and submitted in this process (a second each saved); run and signal are the CLI.
    db = sqlite_database(duplex.db_path)
    try:
        with Client(db) as client:
            task = client.submit(REPO_ROOT / "examples" / "order_dynamic.toml", DYNAMIC_ORDER)
    finally:
        db.dispose()
    worker = duplex.start("run")  # polls every 50 ms (make_duplex's settings)

    def state_of(name: str) -> str:
        return duplex.step_states(task).get(name, ("absent", 0))[0]

    def alive_until(what: str, condition: Callable[[], bool]) -> None:
        def holds() -> bool:
            assert worker.poll() is None, f"the worker exited:\n{duplex.stderr_text()}"
            return condition()

        wait_for(holds, what)

    alive_until("the warehouse wait to start", lambda: state_of("warehouse") == "waiting")
    assert state_of("dispatch") == "pending"  # nothing runs past the wait without its signal
    sent = duplex.ok(
        "signal", task, "warehouse_confirmed", "--payload", '{"dock": "D4", "by": "kim"}'
    )
    assert "signal warehouse_confirmed completed step warehouse" in sent.stdout
    assert "enqueued dispatch" in sent.stdout

    def task_state() -> str:
        return str(duplex.sql("SELECT state FROM tasks WHERE task_uuid = ?", [task])[0][0])

    alive_until("the task to complete", lambda: task_state() == "complete")
    worker.terminate()  # a drain: it exits 0
    assert worker.wait(timeout=30) == 0, duplex.stderr_text()

    rows = duplex.sql(
        "SELECT name, state, item_index, results FROM workflow_steps WHERE task_uuid = ?", [task]
    )
    steps = {
        name: (state, json.loads(results or "null"))
        for name, state, index, results in rows
        if index is None
    }
    items = sorted(
        (index, state, json.loads(results))
        for _, state, index, results in rows
        if index is not None
    )
    assert steps["ship_standard"] == ("skipped", None)
    assert steps["ship_express"] == ("complete", {"service": "express", "booking": "express-B-7"})
    assert items == [
        (0, "complete", {"sku": "MUG", "qty": 2}),
        (1, "complete", {"sku": "TEA", "qty": 1}),
        (2, "complete", {"sku": "PEN", "qty": 3}),
    ]
    assert steps["pack_total"] == ("complete", {"lines": 3, "units": 6})
    assert steps["warehouse"] == ("complete", {"dock": "D4", "by": "kim"})
    assert steps["dispatch"] == ("complete", {"booking": "express-B-7", "dock": "D4"})
    assert {state for state, _ in steps.values()} == {"complete", "skipped"}
