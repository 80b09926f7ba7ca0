"""[6] DomainEventPublisher: delivers committed domain events to in-process subscribers."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

from loguru import logger

from duplex.actors.proxy import TypedProxy, message
from duplex.actors.relay import RelayActorProxy
from duplex.actors.supervised import SupervisedActor, tell
from duplex.messages import DomainEvent
from duplex.observability.counters import EventCounts
from duplex.subscriptions import SubscriberRegistry
from duplex.worker.supervision import Supervisor

_STOP = object()


class DomainEventPublisher(SupervisedActor):
    """Accept committed events into a bounded queue; a delivery thread calls subscribers.

    Subscribers run on their own thread so a slow or failing one never holds up this actor,
    let alone a step. When the queue is full, events are dropped and counted: they remain in
    the ``domain_events`` table for any SQL reader.
    """

    def __init__(
        self,
        subscribers: SubscriberRegistry,
        *,
        buffer_size: int,
        supervisor: Supervisor | None = None,
        counts: EventCounts | None = None,
        relay: RelayActorProxy | None = None,
    ) -> None:
        super().__init__(supervisor)
        self._relay = relay
        self._subscribers = subscribers
        self._queue: queue.Queue[object] = queue.Queue(maxsize=buffer_size)
        self._thread = threading.Thread(
            target=self._deliver_forever, name="duplex-event-delivery", daemon=True
        )
        # Given by the worker, which reads it for its figures (no message); thread-safe.
        self._counts = counts if counts is not None else EventCounts()
        self._counts.watch_queue(self._queue.qsize)

    def on_start(self) -> None:
        self._thread.start()

    def on_stop(self) -> None:
        self.close(timeout_s=5.0)

    def salvage(self) -> None:
        # What is queued was committed: deliver it before the thread goes.
        self.close(timeout_s=5.0)

    def publish(self, events: Sequence[DomainEvent]) -> None:
        """Queue committed events for delivery; drop (and count) what does not fit.

        The relay (when there is one) is woken too: these events are committed.
        """
        if self._relay is not None and events:
            tell(self._relay.wake)
        for event in events:
            try:
                self._queue.put_nowait(event)
                self._count("published")
            except queue.Full:
                self._count("dropped")
                logger.warning("event queue full; dropped {} ({})", event.name, event.event_id)

    def close(self, timeout_s: float) -> bool:
        """Deliver what is queued, then stop the delivery thread; return whether it finished."""
        if not self._thread.is_alive():
            return True
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:  # a subscriber is stuck; its thread is a daemon and dies with us
            logger.error("event delivery is stuck; {} event(s) not delivered", self._queue.qsize())
            return False
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        return dict(self._counts.snapshot())

    def _deliver_forever(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, DomainEvent)
            for subscriber in self._subscribers.matching(item.name):
                try:
                    subscriber(item)
                except Exception:
                    self._count("subscriber_errors")
                    logger.exception("subscriber {!r} failed on {}", subscriber, item.name)
            self._count("delivered")

    def _count(self, key: str) -> None:
        self._counts.add(key)


class DomainEventPublisherProxy(TypedProxy[DomainEventPublisher]):
    """The DomainEventPublisher's messages."""

    publish = message(DomainEventPublisher.publish)
    close = message(DomainEventPublisher.close)
    stats = message(DomainEventPublisher.stats)
