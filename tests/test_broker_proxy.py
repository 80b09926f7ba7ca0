"""The test proxy of ``tests/broker_proxy.py``: it counts publishes right, and a held proxy
keeps confirms from a publisher while its messages still reach the broker."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator

import pika
import pytest

from tests.broker_proxy import BrokerProxy, PublishCounter
from tests.cli.support import wait_for
from tests.relay_support import BrokerQueue, require_rabbitmq


def frame(kind: int, payload: bytes, channel: int = 1) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def method(class_id: int, method_id: int, args: bytes = b"args") -> bytes:
    return frame(1, struct.pack(">HH", class_id, method_id) + args)


# Protocol header, Connection.StartOk, a heartbeat, then three publishes (method, content
# header, body) among other frames; the second publish has no arguments at all.
STREAM = b"".join(
    [
        b"AMQP\x00\x00\x09\x01",
        method(10, 11, b"a" * 300),
        frame(8, b"", channel=0),
        method(60, 40),
        frame(2, b"h" * 14),
        frame(3, b"body" * 100),
        method(60, 40, b""),
        frame(3, b"x"),
        method(85, 10),  # Confirm.Select
        method(60, 41),  # not a publish: Basic.Return's neighbour
        method(60, 40),
    ]
)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 11, 12, 64, len(STREAM)])
def test_publish_counter_counts_publishes_whatever_the_chunks(chunk: int) -> None:
    seen: list[int] = []
    counter = PublishCounter(lambda: seen.append(1))
    for start in range(0, len(STREAM), chunk):
        counter.feed(STREAM[start : start + chunk])
    assert len(seen) == 3


def test_publish_counter_tells_before_the_frame_is_whole() -> None:
    seen: list[int] = []
    counter = PublishCounter(lambda: seen.append(1))
    publish = method(60, 40, b"x" * 50)
    counter.feed(b"AMQP\x00\x00\x09\x01" + publish[:11])  # header and method ids only
    assert seen == [1]


@pytest.fixture
def proxy() -> Iterator[BrokerProxy]:
    require_rabbitmq()
    proxy = BrokerProxy()
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.mark.rabbitmq
def test_a_held_proxy_keeps_the_confirm_while_the_message_reaches_the_queue(
    proxy: BrokerProxy,
) -> None:
    queue = BrokerQueue()
    connection = pika.BlockingConnection(pika.URLParameters(proxy.url))
    publisher: threading.Thread | None = None
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        proxy.hold_at_publish(3)
        for n in (1, 2):
            channel.basic_publish(
                queue.exchange, "k", b"{}", pika.BasicProperties(message_id=str(n))
            )
        assert not proxy.held.is_set()
        confirmed = threading.Event()

        def third() -> None:
            channel.basic_publish(queue.exchange, "k", b"{}", pika.BasicProperties(message_id="3"))
            confirmed.set()

        publisher = threading.Thread(target=third, daemon=True)
        publisher.start()
        got: list[str] = []
        wait_for(lambda: proxy.held.is_set(), "the proxy to hold at the third publish")

        def three_in_queue() -> bool:
            got.extend(m.message_id for m in queue.drain())
            return len(got) == 3

        wait_for(three_in_queue, "the third message to reach the queue")
        assert got == ["1", "2", "3"]
        # The broker has it, and has confirmed it; the publisher cannot know while held.
        assert not confirmed.is_set()
        proxy.release()
        publisher.join(timeout=30)
        assert confirmed.is_set()
    finally:
        proxy.release()  # a publisher still waiting gets its confirm and returns
        if publisher is not None:
            publisher.join(timeout=30)
        if connection.is_open:
            connection.close()
        queue.close()
