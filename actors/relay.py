"""[7] RelayActor: runs the outbox relay (``duplex.events.relay.Relay``) on a thread of its own.

Downstream of the DomainEventPublisher: the publisher ``wake``s it after every commit that
wrote events; on PostgreSQL a LISTEN on ``duplex_events`` wakes it for other processes'
commits too, and a fallback poll (``relay.poll_interval_ms``) covers everything else.
Wake-ups are folded: however many arrive while a pump runs, one more pump follows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

from loguru import logger

from duplex.actors.proxy import TypedProxy, message
from duplex.actors.supervised import SupervisedActor, tell
from duplex.clock import Timer, TimerHandle
from duplex.events.relay import Relay
from duplex.storage.listen import EventListener, SequenceRange
from duplex.worker.supervision import Supervisor


class RelayActor(SupervisedActor):
    """Own the relay's thread, its wake-ups and its timer; the logic is ``Relay``'s."""

    def __init__(
        self,
        relay: Relay,
        timer: Timer,
        *,
        listen: Callable[[Callable[[list[SequenceRange]], None]], EventListener] | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        super().__init__(supervisor)
        self._relay = relay
        self._timer = timer
        self._listen = listen
        self._listener: EventListener | None = None
        self._self: RelayActorProxy | None = None
        self._pump_queued = False
        self._handle: TimerHandle | None = None

    def on_start(self) -> None:
        self._self = RelayActorProxy.of(self.actor_ref)
        if self._listen is not None:
            self._listener = self._listen(lambda _ranges: self._wake_from_outside())
            self._listener.start()
        # The first pump waits for the worker's ``wake`` once everything is wired: a relay
        # that failed at once would otherwise be dead before the worker held its proxy.

    def on_stop(self) -> None:
        self._shut()

    def salvage(self) -> None:
        # Nothing is held in memory: unpublished events stay in the table for the next relay.
        self._shut()

    def wake(self) -> None:
        """Events were committed (or may be due): pump soon, once."""
        if self._pump_queued or self._self is None:
            return
        self._pump_queued = True
        tell(self._self.pump)

    def pump(self) -> None:
        self._pump_queued = False
        delay = self._relay.pump()
        if delay <= 0:
            self.wake()
            return
        if self._handle is not None:
            self._handle.cancel()
        assert self._self is not None
        self._handle = self._timer.call_later(delay, partial(tell, self._self.wake))

    def drain(self, timeout_s: float) -> int:
        """Publish what is due until nothing is, or ``timeout_s`` passes (the worker's stop)."""
        published_before = self._relay.stats.published
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._relay.pump(budget_s=max(0.0, deadline - time.monotonic())) != 0.0:
                break
        return self._relay.stats.published - published_before

    def stats(self) -> dict[str, Any]:
        return {**self._relay.snapshot(), "lag": self._relay.lag()}

    def _wake_from_outside(self) -> None:
        # Called on the listener's thread: only a message may cross into the actor.
        if self._self is not None and not tell(self._self.wake):
            raise RuntimeError("relay actor gone")

    def _shut(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        try:
            self._relay.close()
        except Exception:
            logger.exception("relay: closing the broker connection failed")


class RelayActorProxy(TypedProxy[RelayActor]):
    """The RelayActor's messages."""

    wake = message(RelayActor.wake)
    pump = message(RelayActor.pump)
    drain = message(RelayActor.drain)
    stats = message(RelayActor.stats)
