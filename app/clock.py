"""Time: the current UTC time, and one background thread that fires callbacks at given times.

Actors use it to send themselves messages later (poll ticks, handler deadlines, commit retry
backoff) without a thread per timer. Callbacks must be quick: they only ``tell``.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from loguru import logger

MAX_DELAY_S = 30 * 86400.0
COMPACT_AT = 1024


def utcnow() -> datetime:
    """Return the current time in UTC."""
    return datetime.now(UTC)


class TimerHandle:
    """A scheduled callback; ``cancel()`` stops it from firing."""

    __slots__ = ("_timer", "cancelled")

    def __init__(self, timer: Timer | None = None) -> None:
        self._timer = timer
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self._timer is not None:
                self._timer._count_cancelled()


class Timer:
    """A heap of (when, callback) served by one daemon thread."""

    def __init__(self, name: str = "duplex-timer") -> None:
        self._heap: list[tuple[float, int, TimerHandle, Callable[[], object]]] = []
        self._cancelled = 0  # cancelled entries still in the heap (an estimate)
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay_s: float, callback: Callable[[], object]) -> TimerHandle:
        """Run ``callback`` on the timer thread after ``delay_s`` seconds."""
        handle = TimerHandle(self)
        # Clamp: Condition.wait overflows on huge timeouts, and nothing here needs > 30 days.
        delay_s = min(max(0.0, delay_s), MAX_DELAY_S)
        entry = (time.monotonic() + delay_s, next(self._seq), handle, callback)
        with self._cond:
            heapq.heappush(self._heap, entry)
            # Wake the thread only when its next deadline moved earlier; most timers (handler
            # deadlines) fire long after the head, and a wake-up per step costs the GIL.
            if self._heap[0] is entry:
                self._cond.notify()
            # A handler deadline is cancelled as soon as its step ends, but its entry would
            # stay until its time came: at thousands of steps a second and a 30 s timeout,
            # tens of thousands of dead entries. Drop them once they are most of the heap.
            if self._cancelled > COMPACT_AT and self._cancelled * 2 > len(self._heap):
                self._heap = [e for e in self._heap if not e[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0
        return handle

    @property
    def pending(self) -> int:
        """Entries in the heap, cancelled ones not yet dropped included."""
        with self._cond:
            return len(self._heap)

    def _count_cancelled(self) -> None:
        with self._cond:
            self._cancelled += 1

    def stop(self) -> None:
        """Stop the thread; pending callbacks never fire."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    # Drop cancelled entries eagerly so the heap stays as small as what is live.
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                        self._cancelled = max(0, self._cancelled - 1)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(min(wait, 3600.0))
                if self._stopped:
                    return
                _, _, handle, callback = heapq.heappop(self._heap)
            if handle.cancelled:
                continue
            try:
                callback()
            except Exception:
                # A callback that fails must not stop every later timer.
                logger.exception("timer callback failed")
