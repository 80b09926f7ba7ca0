"""The worker's schedule firer: its rounds on a fake clock, its metrics, the declared
schedules it syncs, and a real embedded worker firing, running and announcing."""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from duplex.handlers import HandlerRegistry
from duplex.messages import DomainEvent
from duplex.observability.counters import ScheduleMetrics
from duplex.observability.metrics import worker_registry
from duplex.schedules.poller import SchedulePoller
from duplex.settings import ScheduleSettings
from duplex.storage.db import Database
from duplex.storage.queries import get_task
from duplex.storage.schedules import list_schedules
from duplex.subscriptions import SubscriberRegistry
from duplex.worker.wiring import Worker
from tests.conftest import make_settings, wait_until
from tests.schedules.support import T0, TEMPLATE_TOML, add, finish_task, seconds


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_rounds_fire_count_and_hand_on_what_they_fired(sqlite_db: Database) -> None:
    add(sqlite_db, "fast", every="1s", overlap="skip", catchup="5s")
    clock = FakeClock(T0 + seconds(1))
    metrics = ScheduleMetrics()
    handed: list[int] = []
    poller = SchedulePoller(
        sqlite_db,
        "w",
        ScheduleSettings(batch_size=1, overdue_after_ms=1500),
        metrics,
        on_fired=lambda report: handed.append(len(report.events)),
        clock=clock,
    )
    assert poller.round() == 1
    assert metrics.fires.snapshot() == {("fast",): 1}
    # 2 s later: 2 s is skipped (the first task runs); 3 s is due but not yet checked.
    clock.now = T0 + seconds(3)
    assert poller.round() == 2
    assert metrics.skips.snapshot() == {("fast", "overlap"): 2}
    # A long pause: 4..14 s missed the 5 s window, 15..20 s: one fires (late), the rest skip.
    with sqlite_db.read() as conn:
        (schedule,) = list_schedules(conn)
    assert schedule.last_task_uuid is not None
    finish_task(sqlite_db, schedule.last_task_uuid)
    clock.now = T0 + seconds(20)
    poller.round()
    assert metrics.skips.snapshot()[("fast", "missed")] == 11
    assert metrics.fires.snapshot() == {("fast",): 2}
    assert metrics.overdue.snapshot() == {("fast",): 1}  # 15 s fired at 20 s
    assert handed == [1, 1]


def test_declared_schedules_sync_and_a_broken_template_is_skipped(
    sqlite_db: Database, tmp_path: Path
) -> None:
    (tmp_path / "tick.toml").write_text(
        TEMPLATE_TOML + '[[schedules]]\nname = "from-file"\ncron = "*/5 * * * *"\n'
    )
    (tmp_path / "broken.toml").write_text("name = ")
    poller = SchedulePoller(
        sqlite_db, "w", ScheduleSettings(), ScheduleMetrics(), templates_dir=tmp_path
    )
    poller.sync()
    with sqlite_db.read() as conn:
        (schedule,) = list_schedules(conn)
    assert (schedule.name, schedule.declared_in, schedule.cron) == (
        "from-file",
        "tick",
        "*/5 * * * *",
    )


def test_an_embedded_worker_fires_runs_and_announces_its_schedules(
    sqlite_db: Database, tmp_path: Path
) -> None:
    (tmp_path / "tick.toml").write_text(
        TEMPLATE_TOML + '[[schedules]]\nname = "often"\nevery = "200ms"\noverlap = "allow"\n'
    )
    registry = HandlerRegistry()
    registry.register("t.work", lambda ctx: {"ok": True})
    subscribers = SubscriberRegistry()
    fired: list[DomainEvent] = []
    three = threading.Event()

    def on_fired(event: DomainEvent) -> None:
        fired.append(event)
        if len(fired) >= 3:
            three.set()

    subscribers.add("schedule.fired", on_fired)
    worker = Worker(
        make_settings(
            str(sqlite_db.url),
            event_system={"polling_interval_ms": 20},
            schedules={"poll_interval_ms": 20},
            templates={"directory": str(tmp_path)},
        ),
        sqlite_db,
        registry=registry,
        subscribers=subscribers,
    )
    worker.start()
    try:
        assert three.wait(30)
        task_uuid = fired[0].task_uuid
        assert wait_until(lambda: _state(sqlite_db, task_uuid) == "complete")
        assert fired[0].payload["schedule"] == "often"
        scrape = generate_latest(worker_registry(worker.metrics)).decode()
        assert 'duplex_schedule_fires_total{schedule="often"}' in scrape
    finally:
        worker.stop()


def _state(db: Database, task_uuid: str) -> str:
    with db.read() as conn:
        return get_task(conn, task_uuid).state


def test_a_round_with_nothing_due_opens_no_write_transaction(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite an empty write would make every commit of the workers wait."""
    add(sqlite_db, "later", every="1h")
    writes = []
    real_write = sqlite_db.write

    def counted_write() -> Any:
        writes.append(1)
        return real_write()

    monkeypatch.setattr(sqlite_db, "write", counted_write)
    clock = FakeClock(T0 + seconds(5))
    poller = SchedulePoller(sqlite_db, "w", ScheduleSettings(), ScheduleMetrics(), clock=clock)
    assert poller.round() == 0
    assert writes == []
    clock.now = T0 + seconds(3600)
    assert poller.round() == 1
    assert writes == [1]
