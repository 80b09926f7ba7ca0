"""PostgreSQL: the ``duplex_events`` channel, on which each commit announces its events.

The commit path (``app.storage.outbox.notify_new_events``) sends, at the commit of every
batch that wrote domain events, ``NOTIFY duplex_events`` with a JSON array of
``{"task_uuid", "first", "last"}``: the new sequence range of each task. External
consumers can LISTEN for it and read the rows; Duplex's relay and ``duplex events
--follow`` use it to wake up at once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from loguru import logger

from app.notifications import libpq_url
from app.storage.outbox import CHANNEL

__all__ = ["CHANNEL", "EventListener", "SequenceRange", "parse_payload"]


@dataclass(frozen=True, slots=True)
class SequenceRange:
    """New events of one task: sequences ``first`` to ``last``, inclusive."""

    task_uuid: str
    first: int
    last: int


def parse_payload(payload: str) -> list[SequenceRange]:
    """Read one notification's payload; an unreadable one yields nothing."""
    try:
        items = json.loads(payload)
        return [SequenceRange(str(i["task_uuid"]), int(i["first"]), int(i["last"])) for i in items]
    except (ValueError, TypeError, KeyError):
        return []


class EventListener:
    """A thread that LISTENs on ``duplex_events`` and reconnects when the server goes away.

    ``on_events`` gets the ranges of each notification; after every (re)connect it gets an
    empty list, since what was committed meanwhile was not announced to this listener.
    """

    def __init__(
        self,
        url: str,
        on_events: Callable[[list[SequenceRange]], None],
        *,
        reconnect_max_s: float = 10.0,
    ) -> None:
        self._conninfo = libpq_url(url)
        self._on_events = on_events
        self._reconnect_max_s = reconnect_max_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="duplex-events-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _signal(self, ranges: list[SequenceRange]) -> None:
        try:
            self._on_events(ranges)
        except Exception:  # the receiver is gone (stopping); nothing left to wake
            self._stop.set()

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.5
                    self._signal([])
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._signal(parse_payload(note.payload))
            except psycopg.Error as exc:
                if self._stop.is_set():
                    return
                logger.warning("LISTEN {} lost ({}); retrying in {:.1f}s", CHANNEL, exc, delay)
                self._stop.wait(delay)
                delay = min(self._reconnect_max_s, delay * 2)
