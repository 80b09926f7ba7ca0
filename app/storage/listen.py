"""PostgreSQL LISTEN/NOTIFY: the two channels Duplex notifies on, and their listeners.

* ``duplex_work`` (``WORK_CHANNEL``): a trigger (migration 0002) sends
  ``NOTIFY duplex_work, '<namespace>'`` whenever a step becomes claimable.
  ``NotifyWorkListener`` calls ``on_work`` for the namespaces a worker serves, so it need not
  wait for its next poll. It is one ``WorkListener``, what the intake starts and stops; on
  SQLite the other is ``duplex.intake.wake.WakeListener``.
* ``duplex_events`` (``EVENTS_CHANNEL``): the commit path (``notify_new_events``) sends, at the
  commit of every batch that wrote domain events, a JSON array of
  ``{"task_uuid", "first", "last"}``: the new sequence range of each task. External consumers
  can LISTEN for it and read the rows; Duplex's relay and ``duplex events --follow`` use it
  (``EventListener``) to wake up at once.

Each listener keeps one dedicated connection LISTENing on its own thread. ``listen_on`` is how
the worker and the CLI build one: only on PostgreSQL, once they know what it should call.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import psycopg
from loguru import logger
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

from duplex.messages import DomainEvent
from duplex.storage.db import Database
from duplex.storage.direct import DirectStatement

# Both channel names are documented in docs/relay.md and docs/architecture.md; the work
# channel's is also in migration 0002.
WORK_CHANNEL = "duplex_work"
EVENTS_CHANNEL = "duplex_events"
# PostgreSQL refuses payloads of 8000 bytes or more.
_PAYLOAD_LIMIT = 7000


def libpq_url(sqlalchemy_url: str) -> str:
    """Turn a SQLAlchemy PostgreSQL URL into one psycopg accepts."""
    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


# --- the events channel: what a commit announces ------------------------------------------


@dataclass(frozen=True, slots=True)
class SequenceRange:
    """New events of one task: sequences ``first`` to ``last``, inclusive."""

    task_uuid: str
    first: int
    last: int


def notify_new_events(conn: Connection, events: Sequence[DomainEvent]) -> None:
    """PostgreSQL: announce a commit's new sequence ranges on ``duplex_events``.

    Inside the commit's transaction, so the notification is delivered at its commit and
    never for a rollback. The payload is a JSON array of ``{"task_uuid", "first", "last"}``,
    one item per task, split over several notifications past 7000 bytes.
    """
    if not events or conn.dialect.name != "postgresql":
        return
    ranges: dict[str, tuple[int, int]] = {}
    for event in events:
        low, high = ranges.get(event.task_uuid, (event.sequence, event.sequence))
        ranges[event.task_uuid] = (min(low, event.sequence), max(high, event.sequence))
    payloads: list[str] = []
    chunk: list[str] = []
    size = 2
    for task_uuid, (first, last) in sorted(ranges.items()):
        item = json.dumps({"task_uuid": task_uuid, "first": first, "last": last})
        if chunk and size + len(item) + 1 > _PAYLOAD_LIMIT:
            payloads.append("[" + ",".join(chunk) + "]")
            chunk, size = [], 2
        chunk.append(item)
        size += len(item) + 1
    payloads.append("[" + ",".join(chunk) + "]")
    for payload in payloads:
        _NOTIFY.rowcount(conn, {"channel": EVENTS_CHANNEL, "payload": payload})


# Run at the driver (``duplex.storage.direct``): a hop sends one.
_NOTIFY = DirectStatement(text("SELECT pg_notify(:channel, :payload)"))


def notify_work(conn: Connection, namespaces: Collection[str]) -> None:
    """Send the work notification for ``namespaces`` at this transaction's commit.

    For a change that makes steps claimable without touching them (``duplex resume``): the
    trigger of migration 0002 covers every change of a step's state. Nothing on SQLite.
    """
    if conn.dialect.name != "postgresql":
        return
    for namespace in sorted(namespaces):
        _NOTIFY.rowcount(conn, {"channel": WORK_CHANNEL, "payload": namespace})


def parse_payload(payload: str) -> list[SequenceRange]:
    """Read one ``duplex_events`` notification's payload; an unreadable one yields nothing."""
    try:
        items = json.loads(payload)
        return [SequenceRange(str(i["task_uuid"]), int(i["first"]), int(i["last"])) for i in items]
    except (ValueError, TypeError, KeyError):
        return []


# --- listeners --------------------------------------------------------------------------------
class WorkListener(Protocol):
    """What tells the intake of new work besides its poll: started once the intake begins,
    stopped with it. Built with the intake's ``on_work``, which it calls when work may wait."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class ChannelListener:
    """A thread that LISTENs on one channel and reconnects when the server goes away.

    ``on_connect`` runs after every (re)connect, since what was notified meanwhile was missed;
    ``on_notify`` gets each notification's payload. When either raises, the receiver is gone
    (stopping) and the thread ends.
    """

    def __init__(
        self,
        url: str,
        channel: str,
        *,
        on_connect: Callable[[], None],
        on_notify: Callable[[str], None],
        name: str,
        reconnect_max_s: float,
    ) -> None:
        self._conninfo = libpq_url(url)
        self._channel = channel
        self._on_connect = on_connect
        self._on_notify = on_notify
        self._reconnect_max_s = reconnect_max_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _signal(self, callback: Callable[..., None], *args: str) -> None:
        try:
            callback(*args)
        except Exception:  # the receiver is gone (stopping); nothing left to wake
            self._stop.set()

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {self._channel}")
                    delay = 0.5
                    self._signal(self._on_connect)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._signal(self._on_notify, note.payload)
            except psycopg.Error as exc:
                if self._stop.is_set():
                    return
                # Polling covers the gap; keep trying to get the push back.
                logger.warning(
                    "LISTEN connection lost on {} ({}); retrying in {:.1f}s",
                    self._channel,
                    exc,
                    delay,
                )
                self._stop.wait(delay)
                delay = min(self._reconnect_max_s, delay * 2)


class NotifyWorkListener(ChannelListener):
    """Calls ``on_work`` for work notifications about the namespaces this worker serves."""

    def __init__(
        self,
        url: str,
        namespaces: Collection[str],
        on_work: Callable[[], None],
        *,
        reconnect_max_s: float = 30.0,
    ) -> None:
        served = frozenset(namespaces)

        def on_notify(namespace: str) -> None:
            if namespace in served:
                on_work()

        super().__init__(
            url,
            WORK_CHANNEL,
            on_connect=on_work,  # anything committed while (re)connecting was missed: look
            on_notify=on_notify,
            name="duplex-listen",
            reconnect_max_s=reconnect_max_s,
        )


class EventListener(ChannelListener):
    """LISTENs on ``duplex_events``; ``on_events`` gets the ranges of each notification.

    After every (re)connect it gets an empty list, since what was committed meanwhile was not
    announced to this listener.
    """

    def __init__(
        self,
        url: str,
        on_events: Callable[[list[SequenceRange]], None],
        *,
        reconnect_max_s: float = 10.0,
    ) -> None:
        super().__init__(
            url,
            EVENTS_CHANNEL,
            on_connect=lambda: on_events([]),
            on_notify=lambda payload: on_events(parse_payload(payload)),
            name="duplex-events-listen",
            reconnect_max_s=reconnect_max_s,
        )


Callback = TypeVar("Callback")
Listener = TypeVar("Listener", bound=ChannelListener)


def listen_on(
    db: Database, listener: Callable[[str, Callback], Listener]
) -> Callable[[Callback], Listener] | None:
    """How to build ``listener(url, callback)`` on ``db`` given its callback (built, not
    started); None unless ``db`` is PostgreSQL, the one database with LISTEN."""
    if db.dialect != "postgresql":
        return None
    url = db.url

    def listen(callback: Callback) -> Listener:
        return listener(url, callback)

    return listen
