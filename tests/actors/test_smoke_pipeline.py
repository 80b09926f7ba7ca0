"""One workflow through the real actors on SQLite: the pipeline is wired end to end."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import select

from duplex.clock import utcnow
from duplex.handlers import HandlerRegistry, StepContext
from duplex.messages import DomainEvent
from duplex.storage.models import workflow_steps
from duplex.storage.submission import create_task
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import parse_template
from duplex.worker.wiring import Worker
from tests.conftest import make_settings, sqlite_database

TEMPLATE = """
name = "diamond"
[[steps]]
name = "a"
handler = "t.echo"
[[steps]]
name = "b"
handler = "t.echo"
depends_on = ["a"]
[[steps]]
name = "c"
handler = "t.echo"
depends_on = ["a"]
[[steps]]
name = "d"
handler = "t.echo"
depends_on = ["b", "c"]
"""


def test_diamond_runs_to_completion(tmp_path: Path) -> None:
    db = sqlite_database(tmp_path / "d.db")
    registry, subscribers = HandlerRegistry(), SubscriberRegistry()
    done = threading.Event()
    seen: list[str] = []

    def echo(ctx: StepContext) -> dict[str, object]:
        ctx.emit("test.ran", {"step": ctx.step_name})
        return {"step": ctx.step_name, "parents": sorted(ctx.dependency_results)}

    registry.register("t.echo", echo)

    def on_event(event: DomainEvent) -> None:
        seen.append(event.name)
        if event.name == "step.completed" and event.payload["step_name"] == "d":
            done.set()

    subscribers.add("*", on_event)
    with db.write() as conn:
        task = create_task(conn, parse_template(TEMPLATE), {}, now=utcnow())
    worker = Worker(
        make_settings(str(db.url), worker={"max_concurrent_handlers": 2}),
        db,
        registry=registry,
        subscribers=subscribers,
    )
    worker.start()
    try:
        assert done.wait(10)
    finally:
        worker.stop()
    with db.read() as conn:
        rows = {r.name: r for r in conn.execute(select(workflow_steps))}
    assert {n: r.state for n, r in rows.items()} == dict.fromkeys("abcd", "complete")
    assert rows["d"].results == {"step": "d", "parents": ["b", "c"]}
    assert seen.count("test.ran") == 4
    assert task


def test_in_process_submission_nudges_the_intake(tmp_path: Path) -> None:
    db = sqlite_database(tmp_path / "n.db")
    registry = HandlerRegistry()
    ran = threading.Event()
    registry.register("t.echo", lambda ctx: ran.set())
    # Polling once an hour: only the nudge from Worker.submit can bring the task in.
    settings = make_settings(str(db.url), event_system={"polling_interval_ms": 3_600_000})
    worker = Worker(settings, db, registry=registry, subscribers=SubscriberRegistry())
    worker.start()
    try:
        assert worker.status()["dispatcher"]["dispatched"] == 0
        worker.submit(parse_template('name = "one"\n[[steps]]\nname = "a"\nhandler = "t.echo"\n'))
        assert ran.wait(10)
    finally:
        worker.stop()
