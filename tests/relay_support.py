"""Helpers for the relay tests: a RabbitMQ check, a queue to read from, a fake publisher.

RabbitMQ tests skip on a laptop without a broker, but fail when ``CI`` is set (the same rule
as ``require_postgres``). Every test declares its own exchange and queue (random names), so
parallel runs never read each other's messages.
"""

from __future__ import annotations

import json
import os
import random
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pika
import pika.exceptions
import pytest

from duplex.errors import BrokerUnavailableError
from duplex.events.broker import Message, PublishRejected

RABBITMQ_URL = os.environ.get("DUPLEX_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def rabbitmq_available() -> bool:
    try:
        params = pika.URLParameters(RABBITMQ_URL)
        params.socket_timeout = 2
        params.connection_attempts = 1
        pika.BlockingConnection(params).close()
        return True
    except Exception:
        return False


def require_rabbitmq() -> None:
    """Skip without RabbitMQ, except in CI where a missing broker is a failure."""
    if rabbitmq_available():
        return
    if os.environ.get("CI"):
        pytest.fail(f"RabbitMQ is required in CI but {RABBITMQ_URL} is not reachable")
    pytest.skip(f"RabbitMQ not reachable at {RABBITMQ_URL}")


@dataclass(frozen=True)
class Received:
    """One message as a consumer saw it."""

    message_id: str
    routing_key: str
    envelope: dict[str, Any]
    headers: dict[str, Any]
    properties: pika.BasicProperties


class BrokerQueue:
    """A fresh durable topic exchange and a queue bound to it, read with ``basic_get``."""

    def __init__(self, binding: str = "#", *, attach_to: BrokerQueue | None = None) -> None:
        """Declare a new exchange and queue, or (``attach_to``) read another's queue."""
        suffix = uuid.uuid4().hex[:10]
        self.exchange: str = attach_to.exchange if attach_to else f"duplex.test.{suffix}"
        self.queue: str = attach_to.queue if attach_to else f"duplex.test.q.{suffix}"
        self._owner = attach_to is None
        self._connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        self._channel = self._connection.channel()
        if self._owner:
            self._channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
            self._channel.queue_declare(self.queue, durable=True)
            self._channel.queue_bind(self.queue, self.exchange, routing_key=binding)

    def bind(self, routing_key: str) -> None:
        self._channel.queue_bind(self.queue, self.exchange, routing_key=routing_key)

    def drain(self) -> list[Received]:
        """Every message in the queue now (acknowledged as read)."""
        got: list[Received] = []
        while True:
            method, properties, body = self._channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return got
            got.append(
                Received(
                    properties.message_id,
                    method.routing_key,
                    json.loads(body),
                    dict(properties.headers or {}),
                    properties,
                )
            )

    def close(self) -> None:
        """Delete the queue and exchange (with a new connection if the broker dropped ours)."""
        for attempt in range(2):
            try:
                if attempt or not self._connection.is_open:
                    self._connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
                    self._channel = self._connection.channel()
                if self._owner:
                    self._channel.queue_delete(self.queue)
                    self._channel.exchange_delete(self.exchange)
                self._connection.close()
                return
            except pika.exceptions.AMQPError:
                continue  # the connection was dead without knowing it: once more


def first_arrivals(messages: list[Received]) -> dict[str, list[int]]:
    """Per task, the sequences in the order they first arrived (duplicates dropped)."""
    seen: set[str] = set()
    order: dict[str, list[int]] = {}
    for m in messages:
        assert m.envelope["event_id"] == m.message_id, "message id must be the event id"
        if m.message_id in seen:
            continue
        seen.add(m.message_id)
        order.setdefault(m.envelope["task_uuid"], []).append(m.envelope["sequence"])
    return order


@dataclass
class FakeBroker:
    """What fake publishers delivered, in arrival order, shared by several relays."""

    delivered: list[Message] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def deliver(self, message: Message) -> None:
        with self.lock:
            self.delivered.append(message)

    def first_arrivals(self) -> dict[str, list[int]]:
        seen: set[str] = set()
        order: dict[str, list[int]] = {}
        with self.lock:
            for m in self.delivered:
                if m.message_id in seen:
                    continue
                seen.add(m.message_id)
                order.setdefault(m.headers["task_uuid"], []).append(m.headers["sequence"])
        return order

    def ids(self) -> set[str]:
        with self.lock:
            return {m.message_id for m in self.delivered}


class FakePublisher:
    """An in-memory publisher; ``fault`` decides per message what goes wrong.

    ``fault(message)`` returns None (confirmed), ``"down"`` (the connection drops before the
    confirm: maybe delivered, maybe not), ``"lost_confirm"`` (delivered, then the connection
    drops: a duplicate later), ``"nack"`` or ``"unroutable"``.
    """

    def __init__(
        self,
        broker: FakeBroker,
        fault: Callable[[Message], str | None] = lambda _m: None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.broker = broker
        self.fault = fault
        self.usable = True
        self.rng = rng or random.Random(0)

    def publish(self, message: Message) -> None:
        if not self.usable:
            raise BrokerUnavailableError("closed")
        fault = self.fault(message)
        if fault is None:
            self.broker.deliver(message)
        elif fault == "lost_confirm":
            self.broker.deliver(message)
            self.usable = False
            raise BrokerUnavailableError("connection lost before the confirm")
        elif fault == "down":
            self.usable = False
            raise BrokerUnavailableError("connection refused")
        elif fault == "unroutable":  # the broker took it, but no queue got it
            raise PublishRejected("unroutable", unroutable=True)
        else:
            raise PublishRejected(f"{fault} by the fake broker")

    def keepalive(self) -> None:
        if not self.usable:
            raise BrokerUnavailableError("closed")

    def close(self) -> None:
        self.usable = False


def relay_settings(**overrides: Any) -> Any:
    from duplex.settings import RelaySettings

    values: dict[str, Any] = {
        "enabled": True,
        "url": RABBITMQ_URL,
        "batch_size": 10,
        "max_attempts": 3,
        "backoff_base_ms": 1,
        "backoff_max_ms": 5,
        "poll_interval_ms": 20,
        "connect_timeout_s": 2,
        **overrides,
    }
    return RelaySettings(**values)


def at(now: datetime) -> Callable[[], datetime]:
    return lambda: now
