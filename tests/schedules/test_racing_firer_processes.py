"""Hypothesis on PostgreSQL: N firer *processes* racing over random schedules and random clock
jumps create exactly one task per fire time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.migrate import upgrade_to_head
from tests.conftest import (
    create_postgres_schema,
    drop_postgres_schema,
    postgres_schema_url,
    require_postgres,
)
from tests.schedules.support import (
    ROUNDS,
    SCHEDULES,
    FirerProcess,
    add,
    check_exactly_once,
    wipe,
)

FIRERS = 3


@pytest.fixture
def pg_firers() -> Iterator[tuple[Database, list[FirerProcess]]]:
    require_postgres()
    schema = create_postgres_schema()
    url = postgres_schema_url(schema)
    db = Database(DatabaseSettings(url=url))
    try:
        upgrade_to_head(db)
        yield db, [FirerProcess(url) for _ in range(FIRERS)]
    finally:
        db.dispose()
        drop_postgres_schema(schema)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedules=SCHEDULES, rounds=ROUNDS)
def test_racing_processes_on_postgres_fire_each_fire_time_once(
    pg_firers: tuple[Database, list[FirerProcess]],
    schedules: list[tuple[dict[str, str], str, str]],
    rounds: list[tuple[int, list[int]]],
) -> None:
    db, firers = pg_firers
    wipe(db)
    for index, (spec, overlap, catchup) in enumerate(schedules):
        add(db, f"s{index}", overlap=overlap, catchup=catchup, spec=spec)
    clock_ms = 0
    for jump_ms, skews in rounds:
        clock_ms = max(0, clock_ms + jump_ms)
        for firer, skew in zip(firers, skews, strict=False):  # all at once: they race
            firer.send(f"FIRE {clock_ms + skew}")
        answers = [firer.read() for firer in firers]
        assert answers == ["DONE 0"] * len(firers)
    check_exactly_once(db)
