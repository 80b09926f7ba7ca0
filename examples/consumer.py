"""Example downstream consumer: the order-fulfilment events, from RabbitMQ, each once.

    .venv/bin/python examples/consumer.py [--url AMQP_URL] [--exchange duplex.events]
                                           [--queue orders.fulfilment] [--count N]
                                           [--idle-timeout SECONDS]

Binds a durable queue to the relay's topic exchange for the order events (``order.#``,
``payment.#``, ``stock.#``, ``billing.#``), acknowledges each message after handling it, and
drops duplicates by ``message_id`` (the event id). The relay delivers at least once: a
duplicate can follow a relay crash between the broker's confirm and the marking, or a
consumer that died before its ack. Within a task the relay publishes in ``sequence`` order,
so the consumer also notices a stale message by its sequence.

A real consumer keeps the ids it handled in its own database, in the same transaction as the
effect of handling them; this example keeps them in memory (bounded), which is enough to show
the idea.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from typing import Any

import pika
import pika.exceptions

BINDINGS = ("order.#", "payment.#", "stock.#", "billing.#")


class Deduplicator:
    """Remember the last ``size`` message ids; say whether one was seen before."""

    def __init__(self, size: int = 100_000) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def first_time(self, message_id: str) -> bool:
        if message_id in self._seen:
            self._seen.move_to_end(message_id)
            return False
        self._seen[message_id] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return True


def order_facts(payload: dict[str, Any]) -> dict[str, Any]:
    """The order fields of an event's payload.

    Events a handler emits (``stock.reserved``, ``payment.charged``, ``order.shipped``) carry
    them at the top; an event the template declares (``order.fulfilled``) carries the step's
    result under ``result``, which the ``ship`` handler fills with the same fields.
    """
    result = payload.get("result")
    return {**(result if isinstance(result, dict) else {}), **payload}


def handle(event: dict[str, Any]) -> None:
    """What the downstream system does with an event (here: print it)."""
    facts = order_facts(event["payload"])
    tracking = f" tracking {facts['tracking']}" if "tracking" in facts else ""
    print(
        f"{event['name']:<16} order {facts.get('order_id', '?'):<8} task {event['task_uuid']} "
        f"#{event['sequence']}{tracking}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Consume Duplex order events once each.")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--exchange", default="duplex.events")
    parser.add_argument("--queue", default="orders.fulfilment")
    parser.add_argument("--count", type=int, help="exit after this many new events")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        help="exit once no message came for this many seconds (after the first)",
    )
    args = parser.parse_args(argv)
    try:
        connection = pika.BlockingConnection(pika.URLParameters(args.url))
    except pika.exceptions.AMQPError as exc:
        print(f"consumer: cannot reach the broker at {args.url}: {exc!r}", file=sys.stderr)
        return 1
    channel = connection.channel()
    # Declared here too (same arguments as the relay), so either may start first.
    channel.exchange_declare(args.exchange, exchange_type="topic", durable=True)
    channel.queue_declare(args.queue, durable=True)
    for binding in BINDINGS:
        channel.queue_bind(args.queue, args.exchange, routing_key=binding)
    channel.basic_qos(prefetch_count=100)
    print(f"consumer: bound {args.queue} to {args.exchange} for {', '.join(BINDINGS)}", flush=True)

    dedup = Deduplicator()
    last_sequence: dict[str, int] = {}
    handled = 0
    try:
        for method, properties, body in channel.consume(
            args.queue, inactivity_timeout=args.idle_timeout
        ):
            if method is None:  # idle for --idle-timeout seconds
                if handled:
                    break
                continue
            event = json.loads(body)
            task, sequence = event["task_uuid"], event["sequence"]
            if not dedup.first_time(properties.message_id):
                print(f"duplicate dropped: {properties.message_id}", flush=True)
            elif sequence <= last_sequence.get(task, 0):
                # Per-task order is promised: an older sequence can only be a redelivery.
                print(f"stale message dropped: task {task} #{sequence}", flush=True)
            else:
                handle(event)
                last_sequence[task] = sequence
                handled += 1
            channel.basic_ack(method.delivery_tag)
            if args.count is not None and handled >= args.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        if connection.is_open:
            connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
