"""Typed actor proxies: the messages an actor takes, as mypy sees them.

A plain ``pykka.ActorProxy[X]`` answers every attribute with ``Any``, so a misspelt message
or a wrong argument would only fail at run time, in another thread. Each actor module
declares instead a proxy class naming its messages with ``message`` (``pykka.typing``'s
``proxy_method``, plus ``defer``): calling one returns a ``pykka.Future`` of the method's
result, ``defer`` sends it without an answer, and any other name is a type error.

The class is a type only. At run time the object is pykka's own proxy, which ``of`` casts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, Self, TypeVar, cast

import pykka
from pykka.typing import ActorMemberMixin

P = ParamSpec("P")
R = TypeVar("R")
A = TypeVar("A", bound=pykka.Actor)


class Message(Protocol[P, R]):
    """One message of an actor, reached through its proxy."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> pykka.Future[R]:
        """Ask: send the message and get a future of the answer."""
        ...

    def defer(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Tell: send the message, expect no answer (``ActorDeadError`` if the actor is gone)."""
        ...


class MessageField(Protocol[P, R]):
    """What ``message`` declares on a proxy class: read on a proxy, it is a ``Message``."""

    def __get__(self, instance: Any, owner: type | None = None) -> Message[P, R]: ...


def message(method: Callable[Concatenate[Any, P], R]) -> MessageField[P, R]:
    """Declare ``method`` of the actor as a message of its proxy class."""
    return cast("MessageField[P, R]", method)


class TypedProxy(ActorMemberMixin, Generic[A]):
    """The base of every actor's proxy class; ``actor_ref`` is pykka's, as on any proxy."""

    actor_ref: pykka.ActorRef[A]

    @classmethod
    def of(cls, ref: pykka.ActorRef[A]) -> Self:
        """Return the proxy of the running actor ``ref``, typed as this class."""
        return cast(Self, ref.proxy())
