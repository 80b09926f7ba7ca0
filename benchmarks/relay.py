"""Relay benchmarks (issue 8): events per second through the relay with publisher confirms,
commit-to-consumer latency, and the no-op throughput of the worker with the relay on and off.

    .venv/bin/python benchmarks/relay.py [--quick] [--only NAME ...]

Scenarios: ``publish`` (a backlog of committed events drained by one relay, SQLite and, when
reachable, PostgreSQL), ``latency`` (a worker with its relay, tasks submitted at a steady
rate, a consumer timing each event from its commit stamp to its arrival), ``noop`` (5000
single-step no-op tasks, relay off then on; medians of 3). Needs RabbitMQ on 127.0.0.1:5672;
skips with a note without it. Figures only: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pika
from sqlalchemy import create_engine, text

from benchmarks._common import (
    fresh_database,
    independent_template_text,
    print_load,
    print_machine_info,
    quiet_logging,
    run_until_drained,
)
from duplex import Client
from duplex.clock import utcnow
from duplex.commit.retry import RetryPolicy
from duplex.events.broker import AmqpPublisher
from duplex.events.relay import Relay
from duplex.handlers import HandlerRegistry, StepContext
from duplex.messages import EmittedEvent, StepOutcome
from duplex.settings import DatabaseSettings, RelaySettings, Settings
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.migrate import upgrade_to_head
from duplex.storage.outbox import event_lag
from duplex.storage.results import commit_outcomes
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import parse_template
from duplex.worker.wiring import Worker

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CONCURRENCY = 10


class Queue:
    """A private exchange and queue bound to every routing key."""

    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.exchange, self.queue = f"duplex.bench.{suffix}", f"duplex.bench.q.{suffix}"
        self.connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
        self.channel.queue_declare(self.queue, durable=False, auto_delete=False)
        self.channel.queue_bind(self.queue, self.exchange, routing_key="#")

    def close(self) -> None:
        self.channel.queue_delete(self.queue)
        self.channel.exchange_delete(self.exchange)
        self.connection.close()


def relay_settings(exchange: str, **overrides: Any) -> RelaySettings:
    return RelaySettings(enabled=True, url=AMQP_URL, exchange=exchange, **overrides)


def _write_backlog(db: Database, events: int) -> None:
    """Commit ``events`` events (10 per step, 100 steps per task) through the commit path."""
    steps = events // 10
    template = parse_template(independent_template_text(100, "bench.noop"))
    Client(db).submit_many(template, [{} for _ in range(max(1, steps // 100))])
    policy = RetryPolicy(base_ms=1000, multiplier=2, max_ms=1000, jitter=0)
    while True:
        with db.write() as conn:
            claimed = claim_ready_steps(
                conn, worker_id="bench", namespaces=("default",), limit=500, now=utcnow()
            )
        if not claimed:
            return
        now = utcnow()
        outcomes = [
            StepOutcome(
                s,
                now,
                now,
                result={},
                events=tuple(EmittedEvent("bench.event", {"i": i}) for i in range(9)),
            )
            for s in claimed
        ]
        with db.write() as conn:
            commit_outcomes(conn, outcomes, policy=policy, now=now, rng=random.Random(0))


def bench_publish(quick: bool) -> list[str]:
    events = 2000 if quick else 10_000
    lines = []
    for backend in ("sqlite", "postgres"):
        db, cleanup = _database(backend)
        if db is None:
            lines.append(f"publish ({backend}): skipped, no server")
            continue
        queue = Queue()
        try:
            _write_backlog(db, events)
            cfg = relay_settings(queue.exchange, batch_size=200)

            def connect(c: RelaySettings = cfg) -> AmqpPublisher:
                return AmqpPublisher(c.url, c.exchange, connect_timeout_s=5)

            relay = Relay(db, cfg, connect=connect)
            t0 = time.perf_counter()
            while relay.pump(budget_s=1.0) == 0.0 or relay.stats.published < events:
                if time.perf_counter() - t0 > 300:
                    break
            elapsed = time.perf_counter() - t0
            relay.close()
            rate = relay.stats.published / elapsed
            lines.append(
                f"publish ({backend}): {relay.stats.published} events in {elapsed:.2f} s = "
                f"{rate:.0f} events/s (persistent, confirmed one by one, batches of 200)"
            )
        finally:
            queue.close()
            cleanup()
        print(lines[-1])
    return lines


def bench_latency(quick: bool) -> list[str]:
    tasks = 200 if quick else 1000
    rate_per_s = 100
    queue = Queue()
    latencies: list[float] = []
    done = threading.Event()
    expected = tasks * 2  # bench.emitted + step.completed per task

    def consume() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = connection.channel()
        for _method, _properties, body in channel.consume(queue.queue, auto_ack=True):
            committed = datetime.fromisoformat(json.loads(body)["committed_at"])
            latencies.append((datetime.now(UTC) - committed).total_seconds())
            if len(latencies) >= expected:
                break
        channel.cancel()
        connection.close()
        done.set()

    registry = HandlerRegistry()

    def emit(ctx: StepContext) -> None:
        ctx.emit("bench.emitted", {"n": 1})

    registry.register("bench.emit", emit)
    template = parse_template(independent_template_text(1, "bench.emit"))
    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    with fresh_database() as db:
        settings = Settings(
            database={"url": db.url},
            worker={"max_concurrent_handlers": CONCURRENCY},
            event_system={"polling_interval_ms": 250},
            relay=relay_settings(queue.exchange).model_dump(),
        )
        worker = Worker(settings, db, registry=registry, subscribers=SubscriberRegistry())
        worker.start()
        try:
            start = time.perf_counter()
            for i in range(tasks):
                # A steady rate, as a live system sees it (not one backlog).
                time.sleep(max(0.0, start + i / rate_per_s - time.perf_counter()))
                worker.submit(template)
            done.wait(120)
        finally:
            worker.stop()
    queue.close()
    if len(latencies) < expected:
        return [f"latency: only {len(latencies)}/{expected} events arrived"]
    ms = sorted(x * 1000 for x in latencies)
    p50, p99 = ms[len(ms) // 2], ms[int(len(ms) * 0.99) - 1]
    line = (
        f"latency (SQLite, {tasks} tasks at {rate_per_s}/s, {expected} events): commit -> "
        f"consumer p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms"
    )
    print(line)
    return [line]


def bench_noop(quick: bool) -> list[str]:
    count = 1000 if quick else 5000
    rounds = 1 if quick else 3
    registry = HandlerRegistry()
    registry.register("bench.noop", lambda ctx: None)
    template = parse_template(independent_template_text(1, "bench.noop"))
    figures: dict[str, list[float]] = {"off": [], "on": []}
    published_s: list[float] = []
    for _ in range(rounds):
        for mode in ("off", "on"):
            queue = Queue() if mode == "on" else None
            with fresh_database() as db:
                Client(db).submit_many(template, [{} for _ in range(count)])
                sections: dict[str, Any] = {
                    "database": {"url": db.url},
                    "worker": {"max_concurrent_handlers": CONCURRENCY},
                    "event_system": {"polling_interval_ms": 250},
                }
                if queue is not None:
                    sections["relay"] = relay_settings(queue.exchange).model_dump()
                t0 = time.perf_counter()
                run = run_until_drained(db, Settings(**sections), registry, expected=count)
                figures[mode].append(count / run.drain_s)
                if queue is not None:
                    # The worker's stop publishes what is left (up to 5 s): all of it here?
                    with db.read() as conn:
                        lag = event_lag(conn, now=utcnow())
                    published_s.append(time.perf_counter() - t0)
                    if lag.unpublished:
                        print(f"   !! {lag.unpublished} event(s) left unpublished at exit")
            if queue is not None:
                queue.close()
    off, on = statistics.median(figures["off"]), statistics.median(figures["on"])
    line = (
        f"noop ({count} single-step tasks, SQLite, c={CONCURRENCY}, median of {rounds}): "
        f"relay off {off:.0f} steps/s, relay on {on:.0f} steps/s ({on / off:.2f}x); "
        f"relay on: all {2 * count} events published when the worker had stopped, "
        f"{statistics.median(published_s):.1f} s after its start"
    )
    print(line)
    return [line]


def _database(backend: str) -> tuple[Database | None, Any]:
    if backend == "sqlite":
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="duplex-relay-bench-")
        db = Database(DatabaseSettings(url=f"sqlite:///{Path(tmp.name) / 'bench.db'}"))
        upgrade_to_head(db)

        def cleanup() -> None:
            db.dispose()
            tmp.cleanup()

        return db, cleanup
    schema = f"duplex_bench_{uuid.uuid4().hex[:8]}"
    try:
        engine = create_engine(POSTGRES_URL)
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception:
        return None, lambda: None
    db = Database(DatabaseSettings(url=f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"))
    upgrade_to_head(db)

    def drop() -> None:
        db.dispose()
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()

    return db, drop


SCENARIOS = {"publish": bench_publish, "latency": bench_latency, "noop": bench_noop}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS))
    args = parser.parse_args(argv)
    quiet_logging()
    print_machine_info()
    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except Exception as exc:
        print(f"relay benchmarks skipped: RabbitMQ not reachable at {AMQP_URL} ({exc})")
        return 0
    summary = []
    for name in args.only or list(SCENARIOS):
        summary += SCENARIOS[name](args.quick)
    print()
    print("relay summary")
    for line in summary:
        print(f"  {line}")
    print_load()
    return 0


if __name__ == "__main__":
    sys.exit(main())
