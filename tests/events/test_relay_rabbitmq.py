"""The relay against the real RabbitMQ (127.0.0.1:5672): messages, confirms, dropped
connections, unroutable returns and poison events.

Skips without a broker, fails when ``CI`` is set. Each test has its own exchange and queue.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duplex.clock import utcnow
from duplex.errors import BrokerUnavailableError
from duplex.events.broker import AmqpPublisher, Message
from duplex.events.relay import Relay
from duplex.handlers import HandlerRegistry, StepContext
from duplex.storage.db import Database
from duplex.storage.event_operations import task_events
from duplex.storage.submission import create_task
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import parse_template
from duplex.worker.wiring import Worker
from tests import processes
from tests.broker_proxy import BrokerProxy
from tests.cli.support import wait_for
from tests.conftest import make_settings, sqlite_database
from tests.events.support import (
    check_deliveries,
    claim_all,
    commit,
    outcome,
    pump_until_drained,
    random_workload,
    submit,
    unpublished,
)
from tests.relay_support import (
    RABBITMQ_URL,
    BrokerQueue,
    Received,
    first_arrivals,
    relay_settings,
    require_rabbitmq,
)

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def broker_queue() -> Iterator[BrokerQueue]:
    require_rabbitmq()
    queue = BrokerQueue()
    yield queue
    queue.close()


def amqp_relay(db: Database, exchange: str, **overrides: object) -> Relay:
    cfg = relay_settings(exchange=exchange, **overrides)
    return Relay(
        db,
        cfg,
        connect=lambda: AmqpPublisher(cfg.url, cfg.exchange, connect_timeout_s=2),
    )


def wait_for_messages(queue: BrokerQueue, count: int, timeout_s: float = 20.0) -> list[Received]:
    got: list[Received] = []
    deadline = time.monotonic() + timeout_s
    while len({m.message_id for m in got}) < count and time.monotonic() < deadline:
        got += queue.drain()
        time.sleep(0.02)
    return got


TEMPLATE = """
name = "fan"
[[steps]]
name = "a"
handler = "t.emit"
[[steps]]
name = "b"
handler = "t.emit"
depends_on = ["a"]
[[steps]]
name = "c"
handler = "t.emit"
depends_on = ["a"]
"""


def test_the_worker_relays_committed_events_with_envelope_and_headers(
    tmp_path: Path, broker_queue: BrokerQueue
) -> None:
    db = sqlite_database(tmp_path / "r.db")
    registry = HandlerRegistry()

    def emit(ctx: StepContext) -> dict[str, object]:
        ctx.emit("order.touched", {"step": ctx.step_name})
        return {}

    registry.register("t.emit", emit)
    with db.write() as conn:
        task = create_task(conn, parse_template(TEMPLATE), {}, now=utcnow())
    settings = make_settings(
        str(db.url),
        # Polling once an hour: only the wake-up from the commit path can publish in time.
        relay={
            "enabled": True,
            "url": RABBITMQ_URL,
            "exchange": broker_queue.exchange,
            "poll_interval_ms": 3_600_000,
        },
        event_system={"polling_interval_ms": 50},
    )
    worker = Worker(settings, db, registry=registry, subscribers=SubscriberRegistry())
    worker.start()
    try:
        # 3 steps x (order.touched + step.completed); the relay is woken by each commit.
        got = wait_for_messages(broker_queue, 6)
        stats = worker.status()["relay"]
    finally:
        worker.stop()
    assert first_arrivals(got) == {task: [1, 2, 3, 4, 5, 6]}
    with db.read() as conn:
        events = {e.event_id: e for e in task_events(conn, task)}
    assert all(e.state == "published" for e in events.values())
    message = got[0]
    event = events[message.message_id]
    assert message.routing_key == event.name
    assert message.envelope == {
        "event_id": event.event_id,
        "name": event.name,
        "task_uuid": task,
        "step_uuid": event.step_uuid,
        "namespace": "default",
        "sequence": event.sequence,
        "committed_at": event.created_at.isoformat(),
        "payload": event.payload,
    }
    assert message.headers == {
        "task_uuid": task,
        "step_uuid": event.step_uuid,
        "namespace": "default",
        "sequence": event.sequence,
    }
    assert message.properties.delivery_mode == 2
    assert message.properties.content_type == "application/json"
    assert stats["connected"] is True
    assert stats["lag"]["unpublished"] == 0


def test_connections_closed_by_the_broker_mid_stream_lose_nothing(
    sqlite_db: Database, broker_queue: BrokerQueue
) -> None:
    """The broker closes the relay's connection (``rabbitmqctl close_connection``) again
    and again while the relay publishes.

    The relay publishes through a proxy that holds the broker's replies at a chosen publish
    (``tests/broker_proxy.py``), so each close finds it mid-stream, waiting for a confirm,
    however fast it would otherwise have published everything. Only the relay's connections
    are closed: other tests may be using the broker.
    """
    tasks = [submit(sqlite_db, 40) for _ in range(3)]
    steps = claim_all(sqlite_db)
    for i in range(0, len(steps), 10):
        commit(sqlite_db, [outcome(s, 4) for s in steps[i : i + 10]])
    total = len(steps) * 5
    proxy = BrokerProxy()
    relay = amqp_relay(sqlite_db, broker_queue.exchange, batch_size=20, url=proxy.url)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            if relay.pump() > 0:
                time.sleep(0.005)

    closes = 0
    thread = threading.Thread(target=run)
    try:
        # Four times: the relay publishes a sixth of the events, then waits for a confirm
        # the proxy holds while the broker closes the relay's connection.
        while closes < 4:
            proxy.hold_at_publish(total // 6)
            if closes == 0:
                thread.start()
            wait_for(proxy.held.is_set, "the relay to be waiting for a confirm")
            assert close_from_the_broker(proxy.broker_side_names()), "no connection to close"
            closes += 1
            proxy.release()
        deadline = time.monotonic() + 30
        while unpublished(sqlite_db) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proxy.release()
        stop.set()
        if thread.is_alive():
            thread.join(10)
        relay.close()
        proxy.close()
    assert relay.stats.broker_errors >= closes, "a close did not drop the relay's connection"
    assert not unpublished(sqlite_db)
    reader = BrokerQueue(attach_to=broker_queue)
    try:
        got = wait_for_messages(reader, total)
    finally:
        reader.close()
    ids = Counter(m.message_id for m in got)
    assert len(ids) == total, "an event was lost"
    arrivals = first_arrivals(got)
    assert sorted(arrivals) == sorted(tasks)
    for task in tasks:
        assert arrivals[task] == list(range(1, len(arrivals[task]) + 1))


def close_from_the_broker(names: list[str]) -> int:
    """``rabbitmqctl close_connection`` each connection named; return how many were closed."""
    listed = processes.run(
        ["rabbitmqctl", "list_connections", "pid", "name", "--quiet", "--no-table-headers"],
        text=True,
        timeout=30,
        check=True,
    ).stdout
    pids = [
        pid
        for pid, name in (line.split("\t", 1) for line in listed.splitlines() if "\t" in line)
        if name in names
    ]
    for pid in pids:
        processes.run(
            ["rabbitmqctl", "close_connection", pid, "duplex relay test"], timeout=30, check=True
        )
    return len(pids)


def wait_until_published_more(db: Database, at_least: int) -> None:
    from sqlalchemy import func, select

    from duplex.storage.models import domain_events

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with db.read() as conn:
            n = conn.execute(
                select(func.count()).where(domain_events.c.published_at.is_not(None))
            ).scalar_one()
        if n >= at_least:
            return
        time.sleep(0.01)


def test_a_poison_event_on_the_real_broker_is_dead_lettered_then_retried(
    sqlite_db: Database,
) -> None:
    """unroutable = "retry": an event nobody is bound for fails until a queue is bound."""
    require_rabbitmq()
    reader = BrokerQueue(binding="order.#")
    task = submit(sqlite_db, 1)
    (step,) = claim_all(sqlite_db)
    commit(sqlite_db, [outcome(step, 1, "order.placed")])
    relay = amqp_relay(
        sqlite_db, reader.exchange, unroutable="retry", max_attempts=2, backoff_base_ms=1
    )
    try:
        # order.placed arrives; step.completed (sequence 2) has no binding: dead-lettered.
        deadline = time.monotonic() + 10
        while True:
            relay.pump()
            with sqlite_db.read() as conn:
                events = task_events(conn, task)
            if events[1].state == "dead_lettered" or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert [e.state for e in events] == ["published", "dead_lettered"]
        assert "unroutable" in (events[1].publish_error or "")
        reader.bind("step.#")
        from duplex.storage.event_operations import retry_event

        with sqlite_db.write() as conn:
            retry_event(conn, events[1].event_id, operator="t", now=utcnow(), reason=None)
        pump_until_drained(relay, sqlite_db)
        got = wait_for_messages(reader, 2)
        assert first_arrivals(got)[task] == [1, 2]
    finally:
        relay.close()
        reader.close()


def test_an_unreachable_broker_is_one_clear_error() -> None:
    with pytest.raises(BrokerUnavailableError) as caught:
        AmqpPublisher("amqp://guest:guest@127.0.0.1:1/%2F", "x", connect_timeout_s=1)
    assert "\n" not in str(caught.value)
    assert str(caught.value)


class DroppingPublisher:
    """A real publisher whose connection drops at random: before a message (it never left),
    or after its confirm (it arrived, the relay never hears: a duplicate follows)."""

    def __init__(self, inner: AmqpPublisher, rng: random.Random, rate: float) -> None:
        self.inner = inner
        self.rng = rng
        self.rate = rate

    @property
    def usable(self) -> bool:
        return self.inner.usable

    @usable.setter
    def usable(self, value: bool) -> None:
        self.inner.usable = value

    def publish(self, message: Message) -> None:
        draw = self.rng.random()
        if draw < self.rate / 2:
            self.inner.close()
        self.inner.publish(message)
        if draw > 1 - self.rate / 2:
            self.inner.close()
            raise BrokerUnavailableError("the connection dropped after the confirm")

    def keepalive(self) -> None:
        self.inner.keepalive()

    def close(self) -> None:
        self.inner.close()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_every_committed_event_reaches_a_bound_queue_in_task_order(
    broker_queue: BrokerQueue, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    """The property of ``test_relay_logic`` against the real broker: random workflows, commit
    batches (some rolled back), relay batches and dropped connections. Every committed event
    reaches the bound queue at least once, the first arrivals of each task follow its
    sequence, nothing of a rolled-back commit arrives, and a duplicate is the same message."""
    db = sqlite_database(tmp_path_factory.mktemp("relay-property") / "duplex.db")
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    rate = data.draw(st.sampled_from([0.0, 0.1, 0.3]), label="drop_rate")
    cfg = relay_settings(
        exchange=broker_queue.exchange,
        batch_size=data.draw(st.integers(1, 8), label="relay_batch"),
        max_attempts=1000,
        backoff_base_ms=1,
        backoff_max_ms=5,
    )

    def connect() -> DroppingPublisher:
        return DroppingPublisher(
            AmqpPublisher(cfg.url, cfg.exchange, connect_timeout_s=2), rng, rate
        )

    relay = Relay(db, cfg, connect=connect)
    try:
        tasks, rolled_back = random_workload(db, relay, data, rng)
        received = [m for m in broker_queue.drain() if m.envelope["task_uuid"] in tasks]
        delivered = {m.message_id for m in received}
        check_deliveries(db, tasks, rolled_back, delivered, first_arrivals(received))
    finally:
        relay.close()
        db.dispose()
    bodies: dict[str, Any] = {}
    for message in received:  # a duplicate is the same message: same id, same body
        assert bodies.setdefault(message.message_id, message.envelope) == message.envelope
