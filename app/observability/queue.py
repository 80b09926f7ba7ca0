"""The queue figures: ready steps per namespace, and the relay's lag, read from SQL and cached.

Several readers (Prometheus, a person with curl, ``/health``, the saturation warnings) share
one query per ``observability.queue_refresh_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger


@dataclass(frozen=True)
class QueueFigures:
    """Ready steps per namespace and how long the oldest has been ready (seconds)."""

    ready: dict[str, int]
    oldest_age_s: dict[str, float]
    # The relay's lag (``EventLag.as_json``), when this worker runs a relay.
    relay: dict[str, Any] | None = None
    # The pauses in force (``duplex pause``): (kind, name) pairs.
    paused: tuple[tuple[str, str], ...] = ()
    # Flow control: the busiest concurrency keys (key, running, held, limit), and each rate
    # limit's tokens now (name, tokens).
    keys: tuple[tuple[str, int, int, int], ...] = ()
    tokens: tuple[tuple[str, float], ...] = ()


class QueueProbe:
    """The queue figures, read from SQL at most once per ``refresh_s`` and cached.

    Several scrapes (Prometheus, a person with curl, /health) share one query.
    """

    def __init__(
        self,
        read: Callable[[], QueueFigures],
        refresh_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: QueueFigures | None = None
        self._read_at = float("-inf")
        self.errors = 0

    def figures(self) -> QueueFigures | None:
        """Return the cached figures, refreshed when older than ``refresh_s``; None if the
        database could not be read (and nothing was read before)."""
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._read_at >= self._refresh_s:
                try:
                    self._cached = self._read()
                except Exception as exc:  # a scrape must answer, database or not
                    self.errors += 1
                    logger.debug("queue figures not refreshed: {}", exc)
                # A failure also waits for the next interval: a dead database is not hammered.
                self._read_at = now
            return self._cached
