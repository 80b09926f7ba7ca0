"""The outbox relay, built from settings: one recipe for the worker and ``duplex relay``.

The relay publishes to the broker named by ``[relay]``; on PostgreSQL a LISTEN on the events
channel tells it of other processes' commits at once (elsewhere its poll covers them).
"""

from __future__ import annotations

from collections.abc import Callable

from duplex.events.broker import AmqpPublisher
from duplex.events.relay import Relay
from duplex.settings import RelaySettings
from duplex.storage.db import Database
from duplex.storage.listen import EventListener, SequenceRange, listen_on

OnEvents = Callable[[list[SequenceRange]], None]
ListenForEvents = Callable[[OnEvents], EventListener]


def build_relay(db: Database, settings: RelaySettings) -> Relay:
    """The relay of ``db``'s outbox to the broker of ``settings`` (it connects on first use)."""

    def connect() -> AmqpPublisher:
        return AmqpPublisher(
            settings.url, settings.exchange, connect_timeout_s=settings.connect_timeout_s
        )

    return Relay(db, settings, connect=connect)


def listen_for_events(db: Database) -> ListenForEvents | None:
    """How to build a listener for committed events on ``db``: PostgreSQL only, else None."""
    return listen_on(db, EventListener)
