"""Real actors on a SQLite database, for tests of the guarantees: a fresh database, a task
submitted from step dicts, a running ``Worker`` that is stopped on exit, a step's row.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select

from duplex.actors.completion_processor import CommitObserver
from duplex.clock import utcnow
from duplex.handlers import HandlerRegistry
from duplex.storage.db import Database
from duplex.storage.models import workflow_steps
from duplex.storage.submission import create_task
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import TaskTemplate
from duplex.worker.wiring import Worker
from tests.conftest import make_settings, sqlite_database


def submit(db: Database, steps: list[dict[str, Any]], name: str = "prop") -> str:
    template = TaskTemplate.model_validate({"name": name, "steps": steps})
    with db.write() as conn:
        return create_task(conn, template, {}, now=utcnow())


@contextmanager
def fresh_database() -> Iterator[Database]:
    """A migrated SQLite database in a directory of its own (one per hypothesis example)."""
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite_database(Path(tmp) / "p.db")
        try:
            yield db
        finally:
            db.dispose()


@contextmanager
def running_worker(
    db: Database,
    n: int,
    registry: HandlerRegistry,
    subscribers: SubscriberRegistry | None = None,
    observer: CommitObserver | None = None,
    worker_settings: dict[str, Any] | None = None,
) -> Iterator[tuple[Worker, dict[str, Any]]]:
    """Start a worker with ``n`` slots; stop it on exit, leaving its final stats in the dict."""
    worker = Worker(
        make_settings(
            str(db.url),
            worker={"max_concurrent_handlers": n, **(worker_settings or {})},
            event_system={"polling_interval_ms": 20},
            retry={"backoff_base_ms": 10, "backoff_multiplier": 1.0, "jitter": 0.0},
        ),
        db,
        registry=registry,
        subscribers=subscribers or SubscriberRegistry(),
        observer=observer,
    )
    final: dict[str, Any] = {}
    worker.start()
    try:
        yield worker, final
    finally:
        final.update(worker.stop())


def step_row(db: Database, task_uuid: str, name: str) -> Any:
    with db.read() as conn:
        return conn.execute(
            select(workflow_steps).where(
                workflow_steps.c.task_uuid == task_uuid, workflow_steps.c.name == name
            )
        ).one()
