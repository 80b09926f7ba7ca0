"""Unit tests of the worker's heartbeat and watchdog, driven round by round without threads."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import select

from duplex.commit.buffer import CommitBuffer
from duplex.dispatch.pool import HandlerPool
from duplex.observability.counters import EventCounts
from duplex.observability.metrics import WorkerMetrics
from duplex.observability.saturation import SaturationMonitor
from duplex.storage.db import Database
from duplex.storage.models import workers
from duplex.worker.supervision import ActorFailure, Supervisor
from duplex.worker.watchdog import Heartbeat, Watchdog, dead_actors, failure_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Ref:
    """Stands in for a ``pykka.ActorRef``: a class name and whether it is alive."""

    def __init__(self, name: str, alive: bool = True) -> None:
        self.actor_class = type(name, (), {})
        self.alive = alive

    def is_alive(self) -> bool:
        return self.alive


def row(db: Database, worker_id: str) -> Any:
    with db.read() as conn:
        return conn.execute(select(workers).where(workers.c.worker_id == worker_id)).one()


def heartbeat(db: Database, clock: Clock, metrics: WorkerMetrics | None = None) -> Heartbeat:
    return Heartbeat(
        db,
        "w1",
        metrics or WorkerMetrics("w1"),
        interval_s=1.0,
        claim_timeout_s=3.0,
        clock=clock,
    )


def test_heartbeat_registers_beats_with_the_last_stats_and_marks_the_stop(
    sqlite_db: Database,
) -> None:
    clock = Clock()
    beat = heartbeat(sqlite_db, clock)
    beat.mark_stopped({})  # no row written yet: nothing to mark, and no error
    beat.register()
    registered = row(sqlite_db, "w1")
    assert registered.stopped_at is None
    assert registered.stats == {}
    clock.now += 0.5
    assert beat.age_s() == 0.5
    beat.stats = {"slots": 4}
    assert beat.beat()
    assert beat.age_s() == 0.0
    beaten = row(sqlite_db, "w1")
    assert beaten.stats == {"slots": 4}
    assert beaten.heartbeat_at >= registered.heartbeat_at
    beat.mark_stopped({"uncommitted": 0})
    stopped = row(sqlite_db, "w1")
    assert stopped.stopped_at is not None
    assert stopped.stats == {"uncommitted": 0}


def test_heartbeat_warns_of_abandoned_threads_and_of_a_silence_past_the_timeout(
    sqlite_db: Database,
) -> None:
    from loguru import logger

    clock, metrics = Clock(), WorkerMetrics("w1")
    pool = HandlerPool(2)
    pool.abandoned.add(7)
    metrics.attach(pool=pool, buffer=CommitBuffer(10), events=EventCounts())
    beat = heartbeat(sqlite_db, clock, metrics)
    beat.register()
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    try:
        clock.now += 5.0  # longer than claim_timeout_s
        assert beat.beat()
    finally:
        logger.remove(sink)
    assert any("silent for 5.0s" in line for line in lines)
    assert any("1 abandoned handler thread(s)" in line for line in lines)


def test_a_failed_beat_keeps_the_age_growing(tmp_path: Any) -> None:
    from duplex.settings import DatabaseSettings

    missing = Database(DatabaseSettings(url=f"sqlite:///{tmp_path}/nothing-here/x.db"))
    clock = Clock()
    beat = heartbeat(missing, clock)
    clock.now += 2.0
    assert not beat.beat()
    assert beat.age_s() == 2.0


def test_heartbeat_run_beats_at_a_fixed_rate_until_closing(sqlite_db: Database) -> None:
    beat = Heartbeat(sqlite_db, "w1", WorkerMetrics("w1"), interval_s=0.01, claim_timeout_s=3.0)
    beat.register()
    beats: list[bool] = []
    original = beat.beat
    closing = threading.Event()

    def counted() -> bool:
        beats.append(original())
        if len(beats) == 3:
            closing.set()
        return beats[-1]

    beat.beat = counted  # type: ignore[method-assign]
    beat.run(closing)
    assert beats == [True, True, True]


def test_dead_actors_and_the_failure_they_report() -> None:
    refs: list[Any] = [Ref("EventSystem"), Ref("Dispatcher", alive=False)]
    assert dead_actors(refs) == ["Dispatcher"]
    supervisor = Supervisor()
    # No report: named as stopped unexpectedly, after a short wait for one.
    assert failure_of(supervisor, ["Dispatcher"], grace_s=0.01) == ActorFailure(
        "Dispatcher", "it stopped unexpectedly"
    )
    supervisor.actor_failed("Dispatcher", RuntimeError("boom"))
    assert str(failure_of(supervisor, ["Dispatcher"])) == (
        "actor Dispatcher failed: RuntimeError: boom"
    )


class Calls:
    def __init__(self) -> None:
        self.crashed: list[list[str]] = []
        self.recovered = 0
        self.asked = 0
        self.stats: dict[str, Any] | Exception = {"slots": 2}

    def crash(self, dead: list[str]) -> None:
        self.crashed.append(dead)

    def recover(self) -> None:
        self.recovered += 1

    def collect(self) -> dict[str, Any]:
        self.asked += 1
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


def watchdog(
    beat: Heartbeat, calls: Calls, refs: list[Any], clock: Clock, supervisor: Supervisor
) -> Watchdog:
    return Watchdog(
        supervisor,
        beat,
        SaturationMonitor(60.0, start=clock()),
        refs=lambda: refs,
        running=lambda: True,
        stopping=lambda: False,
        crash=calls.crash,
        recover=calls.recover,
        collect_stats=calls.collect,
        clock=clock,
    )


def test_watchdog_recovers_and_collects_stats_on_their_own_schedules(
    sqlite_db: Database,
) -> None:
    import pykka

    clock, calls, supervisor = Clock(), Calls(), Supervisor()
    beat = heartbeat(sqlite_db, clock)
    dog = watchdog(beat, calls, [Ref("EventSystem")], clock, supervisor)
    assert dog.round()
    # Stats at once; recovery only after min(1 s, claim_timeout_s / 3).
    assert (calls.asked, calls.recovered, beat.stats) == (1, 0, {"slots": 2})
    clock.now += 0.5
    assert dog.round()
    assert (calls.asked, calls.recovered) == (1, 0)
    clock.now += 0.6
    assert dog.round()
    assert (calls.asked, calls.recovered) == (2, 1)
    # Actors that do not answer: the heartbeat keeps the last stats.
    calls.stats = pykka.Timeout("slow")
    clock.now += 1.0
    assert dog.round()
    assert calls.asked == 3
    assert beat.stats == {"slots": 2}
    assert calls.crashed == []


def test_watchdog_crashes_on_a_dead_actor_or_a_reported_failure(sqlite_db: Database) -> None:
    clock, calls, supervisor = Clock(), Calls(), Supervisor()
    beat = heartbeat(sqlite_db, clock)
    refs: list[Any] = [Ref("EventSystem"), Ref("Dispatcher", alive=False)]
    assert not watchdog(beat, calls, refs, clock, supervisor).round()
    assert calls.crashed == [["Dispatcher"]]
    supervisor.actor_failed("StepExecutor", None)
    assert not watchdog(beat, calls, [Ref("StepExecutor")], clock, supervisor).round()
    assert calls.crashed[-1] == []
    assert calls.recovered == 0
    assert calls.asked == 0


def test_watchdog_run_ends_when_the_worker_stops(sqlite_db: Database) -> None:
    clock, calls, supervisor = Clock(), Calls(), Supervisor()
    stopping = [False]
    dog = Watchdog(
        supervisor,
        heartbeat(sqlite_db, clock),
        SaturationMonitor(60.0, start=clock()),
        refs=lambda: [],
        running=lambda: True,
        stopping=lambda: stopping[0],
        crash=calls.crash,
        recover=calls.recover,
        collect_stats=calls.collect,
        tick_s=0.001,
    )
    thread = threading.Thread(target=dog.run, args=(threading.Event(),))
    thread.start()
    stopping[0] = True
    thread.join(5)
    assert not thread.is_alive()
