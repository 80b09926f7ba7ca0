"""The failure policy every Duplex actor shares.

* An exception that escapes a message kills the actor (pykka). ``SupervisedActor.on_failure``
  names it in the log, reports it to the worker's ``Supervisor`` and lets the actor hand on
  what it holds (``salvage``) before its thread ends; the watchdog then stops the worker in
  order.
* Sending to an actor that already died raises ``ActorDeadError`` in the sender, which would
  kill it in turn. ``tell`` sends fire-and-forget and returns False instead, so one failure
  never cascades; the sender decides what its undelivered message means.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Any, ParamSpec

import pykka
from loguru import logger
from pykka.messages import ProxyCall

from duplex.actors.proxy import Message
from duplex.worker.supervision import Supervisor

P = ParamSpec("P")


def tell(method: Message[P, Any], *args: P.args, **kwargs: P.kwargs) -> bool:
    """Send ``method(*args)`` to its actor without waiting; False when that actor is gone."""
    try:
        method.defer(*args, **kwargs)
    except pykka.ActorDeadError:
        return False
    return True


class SupervisedActor(pykka.ThreadingActor):
    """A framework actor: its failure is logged, reported and never silent."""

    def __init__(self, supervisor: Supervisor | None = None) -> None:
        super().__init__()
        self.supervisor = supervisor or Supervisor()

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        name = type(self).__name__
        # pykka has logged the traceback already; this line names the actor and the policy.
        logger.error(
            "actor {} failed ({}: {}); the worker stops",
            name,
            exception_type.__name__ if exception_type else "error",
            exception_value,
        )
        self.supervisor.actor_failed(name, exception_value)
        try:
            self.salvage()
        except Exception:
            logger.exception("actor {} could not hand on its work after failing", name)

    def salvage(self) -> None:
        """Hand on what this actor holds before its thread ends (after a failure)."""


def take_mailbox(actor: pykka.ThreadingActor) -> Iterator[ProxyCall]:
    """Empty a failed actor's mailbox: yield the fire-and-forget calls still in it.

    Callers waiting on an answer get ``ActorDeadError``, as pykka would give them.
    """
    # A failed actor is unregistered and refuses new messages, so the mailbox only shrinks.
    while not actor.actor_inbox.empty():
        envelope = actor.actor_inbox.get()
        if envelope.reply_to is not None:
            dead = pykka.ActorDeadError(f"{actor} failed before handling the message")
            envelope.reply_to.set_exception(exc_info=(type(dead), dead, None))
        elif isinstance(envelope.message, ProxyCall):
            yield envelope.message
