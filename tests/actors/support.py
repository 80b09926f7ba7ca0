"""Real actors on a SQLite database, for tests of the guarantees: a fresh database, a task
submitted from step dicts, a running ``Worker`` that is stopped on exit, a step's row.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from duplex.actors.completion_processor import CommitObserver
from duplex.clock import utcnow
from duplex.handlers import Cancellation, HandlerRegistry
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


@dataclass
class Gauge:
    """How many handlers hold a slot now, and the most that ever did at once.

    A handler holds its slot from ``enter`` until it leaves, or until its attempt's cancellation
    flag is set: the Dispatcher sets the flag of a timed-out attempt before it starts the
    replacement worker, while the abandoned thread may return (and leave) much later.
    """

    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)
    _entered: dict[int, Cancellation] = field(default_factory=dict)
    _tokens: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    @property
    def current(self) -> int:
        with self.lock:
            return self._holding()

    def _holding(self) -> int:
        return sum(not cancelled.is_set() for cancelled in self._entered.values())

    def enter(self, cancelled: Cancellation) -> Callable[[], None]:
        """Take a slot until the returned (idempotent) release, or until ``cancelled`` is set."""
        with self.lock:
            token = next(self._tokens)
            self._entered[token] = cancelled
            # Only an enter adds a holder, so the peak is always reached at one.
            self.peak = max(self.peak, self._holding())
            self.changed.notify_all()

        def leave() -> None:
            with self.lock:
                self._entered.pop(token, None)
                self.changed.notify_all()

        return leave


@dataclass
class Waves:
    """Hold handlers in their slots until the test lets the current wave go."""

    wave: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    def hold(self, timeout_s: float) -> bool:
        """Block until the next wave is released; return False after ``timeout_s``."""
        with self.changed:
            mine = self.wave
            return self.changed.wait_for(lambda: self.wave > mine, timeout_s)

    def release(self) -> None:
        with self.changed:
            self.wave += 1
            self.changed.notify_all()


# A plan is the sequence of what a step's attempts do; the last entry settles the step.
