"""PostgreSQL LISTEN/NOTIFY: learn that work is available without waiting for the next poll.

A trigger (migration 0002) sends ``NOTIFY duplex_work, '<namespace>'`` whenever a step becomes
claimable. ``WorkListener`` keeps one dedicated connection LISTENing on its own thread and
calls ``on_work`` for notifications about the namespaces this worker serves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection

import psycopg
from loguru import logger
from sqlalchemy.engine import make_url

CHANNEL = "duplex_work"


def libpq_url(sqlalchemy_url: str) -> str:
    """Turn a SQLAlchemy PostgreSQL URL into one psycopg accepts."""
    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


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


class WorkListener(ChannelListener):
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
            CHANNEL,
            on_connect=on_work,  # anything committed while (re)connecting was missed: look
            on_notify=on_notify,
            name="duplex-listen",
            reconnect_max_s=reconnect_max_s,
        )
