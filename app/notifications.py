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


class WorkListener:
    """A thread that LISTENs for work notifications and reconnects when the server goes away."""

    def __init__(
        self,
        url: str,
        namespaces: Collection[str],
        on_work: Callable[[], None],
        *,
        reconnect_max_s: float = 30.0,
    ) -> None:
        self._conninfo = libpq_url(url)
        self._namespaces = frozenset(namespaces)
        self._on_work = on_work
        self._reconnect_max_s = reconnect_max_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="duplex-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _signal(self) -> None:
        try:
            self._on_work()
        except Exception:  # the intake is gone (stopping); nothing left to wake
            self._stop.set()

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.5
                    # Anything committed while (re)connecting was missed: look once.
                    self._signal()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            if note.payload in self._namespaces:
                                self._signal()
            except psycopg.Error as exc:
                if self._stop.is_set():
                    return
                # Polling (hybrid mode) covers the gap; keep trying to get the push back.
                logger.warning("LISTEN connection lost ({}); retrying in {:.1f}s", exc, delay)
                self._stop.wait(delay)
                delay = min(self._reconnect_max_s, delay * 2)
