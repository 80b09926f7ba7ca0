"""In-process subscribers to committed domain events: ``@subscribe("payment.*")``."""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable
from typing import TypeVar

from duplex.messages import DomainEvent

Subscriber = Callable[[DomainEvent], object]
S = TypeVar("S", bound=Subscriber)


class SubscriberRegistry:
    """Event-name patterns (shell-style: ``*``, ``?``) mapped to subscriber functions."""

    def __init__(self) -> None:
        self._subscribers: list[tuple[str, Subscriber]] = []
        self._lock = threading.Lock()

    def add(self, pattern: str, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.append((pattern, subscriber))

    def remove(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers = [(p, s) for p, s in self._subscribers if s is not subscriber]

    def matching(self, event_name: str) -> list[Subscriber]:
        """Return the subscribers whose pattern matches ``event_name``, in subscription order."""
        with self._lock:
            entries = list(self._subscribers)
        return [s for pattern, s in entries if fnmatch.fnmatchcase(event_name, pattern)]


subscribers = SubscriberRegistry()


def subscribe(pattern: str, *, registry: SubscriberRegistry = subscribers) -> Callable[[S], S]:
    """Deliver committed domain events whose name matches ``pattern`` to the decorated function."""

    def decorate(func: S) -> S:
        registry.add(pattern, func)
        return func

    return decorate
