"""RabbitMQ through pika: the one place that talks to the broker's client library.

``AmqpPublisher`` holds one ``BlockingConnection`` with publisher confirms on, and a durable
topic exchange. ``publish`` returns only once the broker confirmed the message. pika's
exceptions are mapped here (see ``duplex.errors``): a lost or refused connection becomes
``BrokerUnavailableError`` (retry later, the event is not to blame), a nack or an unroutable
return becomes ``PublishRejectedError`` (counted against that event).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.spec import PERSISTENT_DELIVERY_MODE

from duplex.errors import BrokerUnavailableError, PublishRejectedError

# pika logs every failed connect at ERROR with a traceback, several lines per try; the relay
# says what matters in one line of its own (and keeps retrying), so pika is kept quiet.
logging.getLogger("pika").setLevel(logging.CRITICAL)

# Channel-level refusals caused by the message itself (406: e.g. larger than the broker's
# max_message_size). Others (404: the exchange vanished; 403) are about the setup.
_MESSAGE_FAULTS = {406}


@dataclass(frozen=True, slots=True)
class Message:
    """One AMQP message, ready to publish."""

    routing_key: str
    body: bytes
    message_id: str
    type: str
    timestamp: int
    headers: dict[str, Any]


class PublishRejected(PublishRejectedError):
    """``PublishRejectedError`` that says whether the refusal was an unroutable return."""

    def __init__(self, message: str, *, unroutable: bool = False) -> None:
        super().__init__(message)
        self.unroutable = unroutable


def safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    params = pika.URLParameters(url)
    user = params.credentials.username if hasattr(params.credentials, "username") else ""
    vhost = params.virtual_host
    return f"amqp://{user}@{params.host}:{params.port}/{'' if vhost == '/' else vhost}"


class AmqpPublisher:
    """A confirmed-publish connection to one topic exchange."""

    def __init__(self, url: str, exchange: str, *, connect_timeout_s: float) -> None:
        params = pika.URLParameters(url)
        params.socket_timeout = connect_timeout_s
        params.stack_timeout = connect_timeout_s
        params.blocked_connection_timeout = max(connect_timeout_s, 10.0)
        params.connection_attempts = 1
        self.exchange = exchange
        self.usable = False
        try:
            self._connection = pika.BlockingConnection(params)
            self._channel = self._connection.channel()
            self._channel.exchange_declare(exchange, exchange_type="topic", durable=True)
            self._channel.confirm_delivery()
        except (pika.exceptions.AMQPError, OSError) as exc:
            self.close()
            raise BrokerUnavailableError(describe(exc)) from exc
        self.usable = True

    def publish(self, message: Message) -> None:
        """Publish persistently and wait for the broker's confirm."""
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=PERSISTENT_DELIVERY_MODE,
            message_id=message.message_id,
            type=message.type,
            timestamp=message.timestamp,
            headers=message.headers,
        )
        try:
            self._channel.basic_publish(
                self.exchange, message.routing_key, message.body, properties, mandatory=True
            )
        except pika.exceptions.UnroutableError:
            raise PublishRejected(
                f"unroutable: no queue is bound for routing key {message.routing_key!r}",
                unroutable=True,
            ) from None
        except pika.exceptions.NackError:
            raise PublishRejected("the broker refused the message (nack)") from None
        except pika.exceptions.ChannelClosedByBroker as exc:
            self.usable = False  # the next batch opens a new connection
            if exc.reply_code in _MESSAGE_FAULTS:
                raise PublishRejected(
                    f"the broker refused the message ({exc.reply_code} {exc.reply_text})"
                ) from None
            raise BrokerUnavailableError(describe(exc)) from exc
        except (pika.exceptions.AMQPError, OSError) as exc:
            self.usable = False
            raise BrokerUnavailableError(describe(exc)) from exc

    def keepalive(self) -> None:
        """Serve heartbeats while idle (a blocking connection only does so when called)."""
        try:
            self._connection.process_data_events(time_limit=0)
        except (pika.exceptions.AMQPError, OSError) as exc:
            self.usable = False
            raise BrokerUnavailableError(describe(exc)) from exc

    def close(self) -> None:
        self.usable = False
        connection = getattr(self, "_connection", None)
        if connection is not None and connection.is_open:
            # Already gone: nothing to hand back.
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                connection.close()


def describe(exc: BaseException) -> str:
    """One line about a pika failure: the innermost cause (pika nests them deeply)."""
    root = exc
    for _ in range(10):
        nested = getattr(root, "exceptions", None)  # AMQPConnectionWorkflowFailed
        wrapped = getattr(root, "exception", None)  # AMQPConnectorPhaseErrorBase
        if nested:
            root = nested[-1]
        elif isinstance(wrapped, BaseException):
            root = wrapped
        elif root.args and isinstance(root.args[0], BaseException):
            root = root.args[0]
        else:
            break
    if isinstance(root, (pika.exceptions.ConnectionClosed, pika.exceptions.ChannelClosed)):
        text = f"{root.reply_code} {root.reply_text}"
    else:
        text = str(root).strip()
    return f"{type(root).__name__}: {text}" if text else type(root).__name__


def body_of(envelope: dict[str, Any]) -> bytes:
    """The JSON body of an envelope."""
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()
