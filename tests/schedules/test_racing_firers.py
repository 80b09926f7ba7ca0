"""Hypothesis: N firers racing over random schedules and random clock jumps create exactly one
task per fire time (threads with a database engine each on SQLite; separate processes on
PostgreSQL, in ``test_racing_firer_processes.py``)."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duplex.errors import StorageError
from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.migrate import upgrade_to_head
from tests.schedules.support import ROUNDS, SCHEDULES, T0, add, check_exactly_once, fire, wipe


@pytest.fixture(scope="module")
def sqlite_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("race") / "duplex.db"
    db = Database(DatabaseSettings(url=f"sqlite:///{path}"))
    upgrade_to_head(db)
    db.dispose()
    return path


def fire_until_done(db: Database, now_ms: int, errors: list[BaseException]) -> None:
    now = T0 + timedelta(milliseconds=now_ms)
    for _ in range(200):
        try:
            if not fire(db, now, worker_id=threading.current_thread().name, limit=3).acted:
                return
        except StorageError as exc:  # a transient failure: the poller tries again
            if not exc.transient:
                errors.append(exc)
                return
    errors.append(AssertionError("a firer never ran out of due fire times"))


def race(
    barrier: threading.Barrier, db: Database, now_ms: int, errors: list[BaseException]
) -> None:
    barrier.wait()  # every firer starts at once
    fire_until_done(db, now_ms, errors)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedules=SCHEDULES, rounds=ROUNDS, firers=st.integers(min_value=2, max_value=4))
def test_racing_threads_on_sqlite_fire_each_fire_time_once(
    sqlite_path: Path,
    schedules: list[tuple[dict[str, str], str, str]],
    rounds: list[tuple[int, list[int]]],
    firers: int,
) -> None:
    dbs = [Database(DatabaseSettings(url=f"sqlite:///{sqlite_path}")) for _ in range(firers)]
    try:
        wipe(dbs[0])
        for index, (spec, overlap, catchup) in enumerate(schedules):
            add(dbs[0], f"s{index}", overlap=overlap, catchup=catchup, spec=spec)
        clock_ms = 0
        errors: list[BaseException] = []
        for jump_ms, skews in rounds:
            clock_ms = max(0, clock_ms + jump_ms)
            barrier = threading.Barrier(firers)
            threads = [
                threading.Thread(
                    target=race,
                    args=(barrier, dbs[i], clock_ms + skews[i], errors),
                    name=f"firer-{i}",
                )
                for i in range(firers)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert not errors, errors
        check_exactly_once(dbs[0])
    finally:
        for db in dbs:
            db.dispose()
