"""The relay's logic on real databases (SQLite and PostgreSQL), with an in-memory broker.

Events are written by the real commit path (``commit_outcomes``); the relay is the real
``Relay``; only the broker is fake, so that failures can be injected at any message. The
RabbitMQ tests (``test_relay_rabbitmq.py``) cover the real client.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from duplex.clock import utcnow
from duplex.errors import BrokerUnavailableError, InputError, TransitionError
from duplex.events import relay as relay_module
from duplex.events.broker import Message
from duplex.events.publishing import Backoff, envelope, message_of
from duplex.events.relay import Relay
from duplex.events.relay_lock import RelayLock
from duplex.storage.db import Database
from duplex.storage.event_operations import (
    event_actions,
    get_event,
    retry_event,
    skip_event,
    task_events,
)
from duplex.storage.models import domain_event_actions, domain_events
from duplex.storage.outbox import event_lag, pending_runs
from tests.events.support import (
    check_deliveries,
    claim_all,
    commit,
    committed_events,
    outcome,
    pump_until_drained,
    random_workload,
    submit,
    unpublished,
)
from tests.relay_support import FakeBroker, FakePublisher, relay_settings

de = domain_events


# --- plain pieces --------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.1, 1.0)
    assert [backoff.failed() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.failed() == 0.1


def test_the_message_carries_the_envelope_headers_and_ids(sqlite_db: Database) -> None:
    task = submit(sqlite_db, 1)
    (step,) = claim_all(sqlite_db)
    commit(sqlite_db, [outcome(step, 1, "order.shipped")])
    with sqlite_db.read() as conn:
        event = task_events(conn, task)[0]
    message = message_of(event)
    assert message.routing_key == "order.shipped"
    assert message.message_id == event.event_id
    assert message.headers == {
        "task_uuid": task,
        "step_uuid": step.step_uuid,
        "namespace": "default",
        "sequence": 1,
    }
    body = envelope(event)
    assert set(body) == {
        "event_id",
        "name",
        "task_uuid",
        "step_uuid",
        "namespace",
        "sequence",
        "committed_at",
        "payload",
    }
    assert body["payload"] == {"i": 0, "step": "s0"}


def test_sequences_follow_commit_order_within_each_task(db: Database) -> None:
    tasks = [submit(db, 6), submit(db, 3)]
    steps = claim_all(db)
    random.Random(1).shuffle(steps)
    order: dict[str, list[str]] = {t: [] for t in tasks}
    for i in range(0, len(steps), 2):
        ids = commit(db, [outcome(s, 2) for s in steps[i : i + 2]])
        with db.read() as conn:
            rows = conn.execute(select(de.c.event_id, de.c.task_uuid).where(de.c.event_id.in_(ids)))
            by_id = {r.event_id: r.task_uuid for r in rows}
        for event_id in ids:
            order[by_id[event_id]].append(event_id)
    found = committed_events(db, tasks)
    for task in tasks:
        assert [seq for seq, _ in found[task]] == list(range(1, len(found[task]) + 1))
        assert [event_id for _, event_id in found[task]] == order[task]


def test_a_rolled_back_commit_leaves_no_event_and_no_gap(db: Database) -> None:
    task = submit(db, 2)
    first, second = claim_all(db)
    assert commit(db, [outcome(first, 2)], rollback=True)
    commit(db, [outcome(first, 1)])
    commit(db, [outcome(second, 1)])
    assert [seq for seq, _ in committed_events(db, [task])[task]] == [1, 2, 3, 4]


# --- the property: everything committed arrives, in order, nothing else ---------------------


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_every_committed_event_arrives_in_task_order_despite_broker_failures(
    db: Database, data: st.DataObject
) -> None:
    """Random workflows, commit batches (some rolled back), relay batches and broker faults.

    Faults: the connection drops before a confirm, after a delivery whose confirm is lost
    (a duplicate follows), or a message is nacked (counted against the event and retried).
    """
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    fault_rate = data.draw(st.sampled_from([0.0, 0.05, 0.25]), label="fault_rate")
    broker = FakeBroker()

    def fault(_message: Message) -> str | None:
        if rng.random() >= fault_rate:
            return None
        return rng.choice(["down", "lost_confirm", "nack"])

    relay = Relay(
        db,
        relay_settings(
            batch_size=data.draw(st.integers(1, 8), label="relay_batch"), max_attempts=1000
        ),
        connect=lambda: FakePublisher(broker, fault),
    )
    try:
        tasks, rolled_back = random_workload(db, relay, data, rng)
    finally:
        relay.close()

    delivered = {m.message_id for m in broker.delivered if m.headers["task_uuid"] in tasks}
    check_deliveries(db, tasks, rolled_back, delivered, broker.first_arrivals())
    for message in broker.delivered:  # a duplicate is the same message: same id, same body
        assert f'"event_id":"{message.message_id}"' in message.body.decode()


# --- poison events -------------------------------------------------------------------------


def poison_setup(db: Database) -> tuple[str, str]:
    """A task whose second event is poison, with three after it, and an unrelated task."""
    task = submit(db, 2)
    other = submit(db, 1)
    steps = {(s.task_uuid, s.name): s for s in claim_all(db)}
    commit(db, [outcome(steps[(task, "s0")], 1, "fine")])
    commit(db, [outcome(steps[(task, "s1")], 1, "poison")])  # + its step.completed after it
    commit(db, [outcome(steps[(other, "s0")], 2, "fine")])
    return task, other


def test_a_poison_event_is_dead_lettered_and_its_task_waits_behind_it(db: Database) -> None:
    task, other = poison_setup(db)
    broker = FakeBroker()
    refuse = {"poison"}
    relay = Relay(
        db,
        relay_settings(max_attempts=3),
        connect=lambda: FakePublisher(
            broker, lambda m: "nack" if m.routing_key in refuse else None
        ),
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            relay.pump()
            with db.read() as conn:
                poison = next(e for e in task_events(conn, task) if e.name == "poison")
            if poison.state == "dead_lettered":
                break
            assert time.monotonic() < deadline
            time.sleep(0.002)
        assert poison.publish_attempts == 3
        assert "nack" in (poison.publish_error or "")
        for _ in range(5):
            relay.pump()
        arrivals = broker.first_arrivals()
        # Before the poison: published; the poison and everything after it: waiting.
        assert arrivals[task] == list(range(1, poison.sequence))
        assert arrivals[other] == [1, 2, 3]
        with db.read() as conn:
            lag = event_lag(conn, now=utcnow())
        assert lag.dead_lettered == 1
        assert lag.unpublished == len(task_events_after(db, task, poison.sequence - 1))

        # retry: the broker takes it now; it and the rest of the task follow, in order.
        refuse.clear()
        with db.write() as conn:
            retry_event(conn, poison.event_id, operator="operator:t", now=utcnow(), reason="fixed")
        pump_until_drained(relay, db)
        total = len(task_events_after(db, task, 0))
        assert broker.first_arrivals()[task] == list(range(1, total + 1))
        with db.read() as conn:
            actions = event_actions(conn, poison.event_id)
        assert [(a["action"], a["operator"], a["reason"]) for a in actions] == [
            ("retry", "operator:t", "fixed")
        ]
    finally:
        relay.close()


def task_events_after(db: Database, task: str, sequence: int) -> list[Any]:
    with db.read() as conn:
        return task_events(conn, task, after_sequence=sequence)


def test_skip_settles_a_poison_event_and_releases_the_rest_of_its_task(db: Database) -> None:
    task, _other = poison_setup(db)
    broker = FakeBroker()
    relay = Relay(
        db,
        relay_settings(max_attempts=1),
        connect=lambda: FakePublisher(
            broker, lambda m: "nack" if m.routing_key == "poison" else None
        ),
    )
    try:
        relay.pump()
        with db.read() as conn:
            poison = next(e for e in task_events(conn, task) if e.name == "poison")
        assert poison.state == "dead_lettered"
        with db.read() as conn:
            first = task_events(conn, task)[0]
        with pytest.raises(TransitionError, match="not dead_lettered"), db.write() as conn:
            skip_event(conn, first.event_id, operator="operator:t", now=utcnow(), reason=None)
        with db.write() as conn:
            skip_event(conn, poison.event_id, operator="operator:t", now=utcnow(), reason="bad")
        pump_until_drained(relay, db)
        total = len(task_events_after(db, task, 0))
        expected = [s for s in range(1, total + 1) if s != poison.sequence]
        assert broker.first_arrivals()[task] == expected
        with db.read() as conn:
            assert get_event(conn, poison.event_id).state == "skipped"
            assert event_actions(conn, poison.event_id)[0]["action"] == "skip"
    finally:
        relay.close()


def test_retry_and_skip_of_an_unknown_event_name_it(db: Database) -> None:
    with pytest.raises(InputError, match="no domain event with id nope"), db.write() as conn:
        retry_event(conn, "nope", operator="o", now=utcnow(), reason=None)
    with db.read() as conn:
        assert conn.execute(select(func.count()).select_from(domain_event_actions)).scalar() == 0


@pytest.mark.parametrize(("mode", "published"), [("published", True), ("retry", False)])
def test_the_unroutable_setting_decides_whether_a_returned_message_counts(
    sqlite_db: Database, mode: str, published: bool
) -> None:
    task = submit(sqlite_db, 1)
    (step,) = claim_all(sqlite_db)
    commit(sqlite_db, [outcome(step, 1, "nobody.listens")])
    relay = Relay(
        sqlite_db,
        relay_settings(unroutable=mode, max_attempts=5),
        connect=lambda: FakePublisher(FakeBroker(), lambda m: "unroutable"),
    )
    try:
        relay.pump()
    finally:
        relay.close()
    with sqlite_db.read() as conn:
        first = task_events(conn, task)[0]
    assert (first.state == "published") is published
    if not published:
        assert first.publish_attempts == 1
        assert "unroutable" in (first.publish_error or "")


def test_a_failed_event_waits_for_its_backoff(sqlite_db: Database) -> None:
    submit(sqlite_db, 1)
    (step,) = claim_all(sqlite_db)
    commit(sqlite_db, [outcome(step, 1, "flaky")])
    now = utcnow()
    relay = Relay(
        sqlite_db,
        relay_settings(backoff_base_ms=60_000, backoff_max_ms=60_000),
        connect=lambda: FakePublisher(FakeBroker(), lambda m: "nack"),
        clock=lambda: now,
    )
    try:
        relay.pump()
        with sqlite_db.read() as conn:
            assert pending_runs(conn, limit=10, now=now, lock=False) == []
            later = now + timedelta(seconds=61)
            assert [e.name for e in pending_runs(conn, limit=10, now=later, lock=False)[0]] == [
                "flaky",
                "step.completed",
            ]
    finally:
        relay.close()


# --- several relays ------------------------------------------------------------------------


def test_only_one_relay_at_a_time_publishes_from_a_sqlite_file(sqlite_db: Database) -> None:
    first, second = RelayLock(sqlite_db), RelayLock(sqlite_db)
    assert first.try_acquire()
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    second.release()


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(1, 6),
    fault_rate=st.sampled_from([0.0, 0.1]),
)
def test_two_relays_on_postgres_keep_each_task_in_order(
    postgres_db: Database, seed: int, batch: int, fault_rate: float
) -> None:
    """Two relays pump concurrently while commits go on; per task, first arrivals in order.

    Without faults, every event is published exactly once: the head's row lock keeps the two
    relays off each other's runs.
    """
    db = postgres_db
    rng = random.Random(seed)
    broker = FakeBroker()
    lock = threading.Lock()

    def fault(_message: Message) -> str | None:
        with lock:
            if rng.random() >= fault_rate:
                return None
            return rng.choice(["down", "lost_confirm"])

    relays = [
        Relay(db, relay_settings(batch_size=batch), connect=lambda: FakePublisher(broker, fault))
        for _ in range(2)
    ]
    tasks = [submit(db, 12) for _ in range(3)]
    steps = claim_all(db)
    rng.shuffle(steps)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run(relay: Relay) -> None:
        try:
            while not stop.is_set():
                if relay.pump() > 0:
                    time.sleep(0.001)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in relays]
    for thread in threads:
        thread.start()
    try:
        for i in range(0, len(steps), 3):
            commit(db, [outcome(s, rng.randint(0, 3)) for s in steps[i : i + 3]])
        deadline = time.monotonic() + 30
        while unpublished(db) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        for relay in relays:
            relay.close()
    assert not errors, errors
    assert not unpublished(db)
    committed = committed_events(db, tasks)
    arrivals = broker.first_arrivals()
    for task in tasks:
        assert arrivals.get(task, []) == [seq for seq, _ in committed[task]]
    if fault_rate == 0:
        ids = [m.message_id for m in broker.delivered if m.headers["task_uuid"] in tasks]
        assert len(ids) == len(set(ids)), "two relays published the same event"


def test_wake_ups_while_the_broker_is_down_do_not_reconnect_before_the_backoff(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    submit(sqlite_db, 1)
    (step,) = claim_all(sqlite_db)
    commit(sqlite_db, [outcome(step, 1)])
    attempts = []
    broker = FakeBroker()
    up = [False]
    # The relay's clock, moved by hand: the wake-ups all come within the backoff, however
    # slow the machine, and the next one comes after it.
    now = [1000.0]
    monkeypatch.setattr(relay_module, "time", SimpleNamespace(monotonic=lambda: now[0]))

    def connect() -> FakePublisher:
        attempts.append(now[0])
        if not up[0]:
            raise BrokerUnavailableError("connection refused")
        return FakePublisher(broker)

    relay = Relay(
        sqlite_db, relay_settings(backoff_base_ms=200, backoff_max_ms=200), connect=connect
    )
    try:
        delays = []
        for _ in range(20):  # as if woken by 20 commits, 5 ms apart
            delays.append(relay.pump())
            now[0] += 0.005
        assert len(attempts) == 1
        assert all(0 < d <= 0.2 + 1e-9 for d in delays), delays
        up[0] = True
        now[0] = attempts[0] + 0.21
        relay.pump()
        assert len(attempts) == 2
        assert len(broker.delivered) == 2
    finally:
        relay.close()


def test_a_failing_relay_actor_stops_the_worker_in_order(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the relay (here: in its connect) follows the shared failure policy."""
    from duplex.errors import WorkerCrashedError
    from duplex.events import wiring as relay_wiring
    from duplex.handlers import HandlerRegistry
    from duplex.subscriptions import SubscriberRegistry
    from duplex.worker.wiring import Worker
    from tests.conftest import make_settings, wait_until

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("injected relay bug")

    monkeypatch.setattr(relay_wiring, "AmqpPublisher", broken)
    settings = make_settings(str(sqlite_db.url), relay={"enabled": True})
    worker = Worker(
        settings, sqlite_db, registry=HandlerRegistry(), subscribers=SubscriberRegistry()
    )
    worker.start()
    assert wait_until(lambda: worker.actors is None, timeout_s=20), "worker kept running"
    with pytest.raises(WorkerCrashedError, match="actor RelayActor failed"):
        worker.stop()
