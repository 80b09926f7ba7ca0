"""A firer killed between writing a fire's task and advancing its schedule leaves both or
neither: a real subprocess stops at that point (``after_tasks_written``), is SIGKILLed, and
the database holds no trace of the fire; the next firer fires it once."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.migrate import upgrade_to_head
from duplex.storage.schedules import get_schedule
from tests.conftest import (
    create_postgres_schema,
    drop_postgres_schema,
    postgres_schema_url,
    require_postgres,
    wait_until,
)
from tests.schedules.support import (
    SPECS,
    T0,
    FirerProcess,
    add,
    check_exactly_once,
    fire,
    fire_rows,
    fired_events,
    fired_keys,
    seconds,
    wipe,
)


@pytest.fixture(params=["sqlite", "postgres"], scope="module")
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('kill') / 'duplex.db'}"
        return
    require_postgres()
    schema = create_postgres_schema()
    try:
        yield postgres_schema_url(schema)
    finally:
        drop_postgres_schema(schema)


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    specs=st.lists(SPECS, min_size=1, max_size=3),
    overlap=st.sampled_from(["skip", "buffer_one", "allow"]),
    late_ms=st.integers(min_value=0, max_value=20_000),
)
def test_a_firer_killed_between_task_and_advance_leaves_neither(
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    specs: list[dict[str, str]],
    overlap: str,
    late_ms: int,
) -> None:
    db = Database(DatabaseSettings(url=database_url))
    try:
        upgrade_to_head(db)
        wipe(db)
        names = [f"k{i}" for i in range(len(specs))]
        for name, spec in zip(names, specs, strict=True):
            add(db, name, overlap=overlap, spec=spec)
        with db.read() as conn:
            before = {name: get_schedule(conn, name) for name in names}
        now_ms = 60_000 + late_ms  # everything is due
        marker = tmp_path_factory.mktemp("marker") / "hanging"
        doomed = FirerProcess(database_url)
        doomed.send(f"FIRE_AND_HANG {now_ms} {marker}")
        # The moment: the tasks are written, the schedules not yet advanced, nothing committed.
        assert wait_until(marker.exists, timeout_s=60)
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait(timeout=30)

        assert fired_keys(db) == {}
        assert fired_events(db) == []
        with db.read() as conn:
            assert {name: get_schedule(conn, name) for name in names} == before
        assert all(fire_rows(db, name) == [] for name in names)

        # The next firer fires each of those fire times once (PostgreSQL may take a moment
        # to end the dead firer's transaction and free its row locks).
        now = T0 + seconds(now_ms / 1000)
        assert wait_until(lambda: fire(db, now).acted > 0, timeout_s=30)
        while fire(db, now).acted:
            pass
        assert fired_keys(db)
        check_exactly_once(db)
    finally:
        db.dispose()
