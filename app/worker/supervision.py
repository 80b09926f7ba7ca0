"""What the worker knows about its actors' failures: plain, thread-safe state.

An actor that fails reports here from its own thread (``duplex.actors.supervised``); the worker's
watchdog reads it and stops the worker in order. Nothing here sends messages or blocks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ActorFailure:
    """One actor that died, and why."""

    actor: str
    error: str

    def __str__(self) -> str:
        return f"actor {self.actor} failed: {self.error}"


class Supervisor:
    """Collects actor failures and what the failed actors left behind for the stop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: list[ActorFailure] = []
        self._orphans: list[Any] = []
        self._unsaved = 0
        self.failed = threading.Event()

    def actor_failed(self, actor: str, exc: BaseException | None) -> None:
        """Record that ``actor`` died of ``exc``; wakes the watchdog."""
        error = "its thread died" if exc is None else f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._failures.append(ActorFailure(actor, error))
        self.failed.set()

    def first_failure(self) -> ActorFailure | None:
        with self._lock:
            return self._failures[0] if self._failures else None

    def failures(self) -> list[ActorFailure]:
        with self._lock:
            return list(self._failures)

    def adopt(self, refs: list[Any]) -> None:
        """Handler workers still running when the Dispatcher died; the stop waits for them."""
        with self._lock:
            self._orphans.extend(refs)

    def orphans(self) -> list[Any]:
        with self._lock:
            return list(self._orphans)

    def results_lost(self, count: int) -> None:
        """Count results that could not reach a commit (their claims fall to recovery)."""
        with self._lock:
            self._unsaved += count

    @property
    def lost(self) -> int:
        with self._lock:
            return self._unsaved
