"""Unit tests of how the worker's parts are built from settings: the intake's signals and the
outbox relay (shared with ``duplex relay``)."""

from __future__ import annotations

import pytest

from duplex.events.relay import Relay
from duplex.events.wiring import build_relay, listen_for_events
from duplex.intake.wake import WakeListener
from duplex.storage.db import Database
from duplex.storage.listen import EventListener, NotifyWorkListener
from duplex.worker.listening import intake_signals
from tests.conftest import make_settings


def test_sqlite_polls_and_takes_wake_ups_whatever_the_mode(sqlite_db: Database) -> None:
    for mode in ("polling", "event_driven", "hybrid"):
        settings = make_settings(str(sqlite_db.url), event_system={"deployment_mode": mode})
        polling, listen = intake_signals(settings, sqlite_db, "w1")
        assert polling is True
        assert listen is not None
        listener = listen(lambda: None)  # built, not started: nothing bound yet
        assert isinstance(listener, WakeListener)
        assert listener.address is None
    assert listen_for_events(sqlite_db) is None


@pytest.mark.parametrize(("mode", "polls"), [("event_driven", False), ("hybrid", True)])
def test_postgresql_listens_and_polls_as_the_mode_says(
    postgres_db: Database, mode: str, polls: bool
) -> None:
    settings = make_settings(str(postgres_db.url), event_system={"deployment_mode": mode})
    polling, listen = intake_signals(settings, postgres_db, "w1")
    assert polling is polls
    assert listen is not None
    assert isinstance(listen(lambda: None), NotifyWorkListener)  # built, not started
    events = listen_for_events(postgres_db)
    assert events is not None
    assert isinstance(events(lambda _ranges: None), EventListener)


def test_the_relay_is_built_from_its_settings_and_connects_on_first_use(
    sqlite_db: Database,
) -> None:
    settings = make_settings(str(sqlite_db.url), relay={"enabled": True, "exchange": "x"})
    relay = build_relay(sqlite_db, settings.relay)
    try:
        assert isinstance(relay, Relay)
        assert not relay.connected
    finally:
        relay.close()
