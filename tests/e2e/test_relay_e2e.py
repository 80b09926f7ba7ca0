"""The relay end to end: ``duplex run`` / ``duplex relay`` / ``duplex events`` / ``duplex prune``
as real subprocesses, against the real RabbitMQ and (where named) PostgreSQL.

Assertions are on what reached the queue and on the rows, never on timings.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from sqlalchemy import func, select, update

from duplex.clock import utcnow
from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.models import domain_event_actions, domain_events, workers
from tests import processes
from tests.broker_proxy import BrokerProxy
from tests.cli.support import Duplex, make_duplex, wait_for
from tests.conftest import open_work
from tests.relay_support import RABBITMQ_URL, BrokerQueue, first_arrivals, require_rabbitmq

pytestmark = pytest.mark.e2e
de = domain_events


def relay_env(queue: BrokerQueue | None, **extra: str) -> dict[str, str]:
    env = {
        "DUPLEX_RELAY__URL": RABBITMQ_URL,
        "DUPLEX_RELAY__POLL_INTERVAL_MS": "100",
        "DUPLEX_RELAY__BACKOFF_BASE_MS": "20",
        "DUPLEX_RELAY__BACKOFF_MAX_MS": "200",
        **extra,
    }
    if queue is not None:
        env["DUPLEX_RELAY__EXCHANGE"] = queue.exchange
    return env


def with_env(duplex: Duplex, extra: dict[str, str]) -> Duplex:
    return Duplex(duplex.cwd, duplex.db_path, duplex.run_log, {**duplex.env, **extra})


def wide_template(path: Path, count: int, handler: str = "e2e.echo", inputs: str = "") -> Path:
    steps = "".join(
        f'\n[[steps]]\nname = "s{i:03d}"\nhandler = "{handler}"\n{inputs}' for i in range(count)
    )
    path.write_text(f'name = "e2e_wide_events"\n{steps}')
    return path


def open_db(url: str) -> Database:
    return Database(DatabaseSettings(url=url))


def counts(db: Database) -> tuple[int, int]:
    """(events, unpublished events)."""
    with db.read() as conn:
        total = conn.execute(select(func.count()).select_from(de)).scalar_one()
        left = conn.execute(
            select(func.count()).where(de.c.published_at.is_(None), de.c.skipped_at.is_(None))
        ).scalar_one()
    return int(total), int(left)


def sequences_by_task(db: Database) -> dict[str, list[int]]:
    with db.read() as conn:
        rows = conn.execute(select(de.c.task_uuid, de.c.sequence).order_by(de.c.sequence))
        found: dict[str, list[int]] = {}
        for row in rows:
            found.setdefault(row.task_uuid, []).append(row.sequence)
    return found


def drain_until(queue: BrokerQueue, count: int, timeout_s: float = 30.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len({m.message_id for m in got}) < count and time.monotonic() < deadline:
        got += queue.drain()
        time.sleep(0.05)
    return got


@pytest.fixture
def broker_queue() -> Any:
    require_rabbitmq()
    queue = BrokerQueue()
    yield queue
    queue.close()


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(timeout)


# --- SIGKILL ------------------------------------------------------------------------------

# The relay's message at which the proxy holds the broker's replies (see the test).
HELD_AT = 20
KILL_BATCH_SIZE = 5
KILL_STEPS = 40
KILL_GATED = 4


@pytest.fixture
def broker_proxy() -> Iterator[BrokerProxy]:
    require_rabbitmq()
    proxy = BrokerProxy()
    try:
        yield proxy
    finally:
        proxy.close()


def published_ids(db: Database) -> set[str]:
    with db.read() as conn:
        return set(
            conn.execute(select(de.c.event_id).where(de.c.published_at.is_not(None))).scalars()
        )


def test_sigkill_of_a_worker_while_it_publishes_then_restart_delivers_everything(
    tmp_path: Path, broker_queue: BrokerQueue, broker_proxy: BrokerProxy
) -> None:
    """Guarantee 10 across a SIGKILL: every event is delivered, in order, the ones the broker
    had but never confirmed again with the same message id.

    Why load cannot make this test lose its moment: the moment is made, not waited for. The
    worker's relay publishes through a proxy that holds the broker's replies as the relay's
    HELD_AT-th message goes to the broker. From then on no publisher confirm reaches the
    relay, so it marks nothing more published, however fast or slow the machine runs: the
    message is in the queue but unconfirmed, the events committed after it stay unpublished,
    until the test releases the proxy after the kill. (An earlier version waited to catch the
    relay with events left; on a loaded machine the relay kept up and the moment never came.)
    """
    duplex = with_env(
        make_duplex(tmp_path),
        relay_env(
            broker_queue,
            DUPLEX_RELAY__ENABLED="true",
            DUPLEX_RELAY__URL=broker_proxy.url,
            DUPLEX_RELAY__BATCH_SIZE=str(KILL_BATCH_SIZE),
        ),
    )
    duplex.ok("migrate")
    # Most steps are quick; KILL_GATED wait at a gate that opens only after the kill, so the
    # kill always leaves attempts running, to be recovered (and their events published) by
    # the restart.
    gate = tmp_path / "gate"
    quick = "".join(
        f'\n[[steps]]\nname = "s{i:03d}"\nhandler = "e2e.sleep"\ninputs = {{ seconds = 0.02 }}\n'
        for i in range(KILL_STEPS - KILL_GATED)
    )
    gated = "".join(
        f'\n[[steps]]\nname = "g{i}"\nhandler = "e2e.gate"\n'
        f"inputs = {{ gate = {json.dumps(str(gate))} }}\n"
        for i in range(KILL_GATED)
    )
    (tmp_path / "t.toml").write_text(f'name = "e2e_kill_while_publishing"\n{quick}{gated}')
    task = duplex.submit(tmp_path / "t.toml")
    db = open_db(f"sqlite:///{duplex.db_path}")
    try:
        broker_proxy.hold_at_publish(HELD_AT)
        worker = duplex.start("run", "--concurrency", "8")

        def held_with_gated_steps_running() -> bool:
            assert worker.poll() is None, duplex.stderr_text()
            running = duplex.sql(
                "SELECT COUNT(*) FROM workflow_steps WHERE name LIKE 'g%' AND state = 'in_progress'"
            )
            return broker_proxy.held.is_set() and running == [(KILL_GATED,)]

        wait_for(held_with_gated_steps_running, f"the relay to send its message #{HELD_AT}")
        # Exactly the relay's first HELD_AT messages reach the queue: it waits for the
        # confirm of the last one, which the proxy holds.
        before_kill = drain_until(broker_queue, HELD_AT)
        in_queue = {m.message_id for m in before_kill}
        assert len(in_queue) == HELD_AT, sorted(in_queue)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        gate.touch()
        total_at_kill, left_at_kill = counts(db)
        marked = published_ids(db)
        # Batches before the held one were confirmed and marked; the held batch was not.
        assert marked < in_queue
        assert HELD_AT - KILL_BATCH_SIZE <= len(marked) < HELD_AT, len(marked)
        assert left_at_kill == total_at_kill - len(marked) > 0
        assert first_arrivals(before_kill)[task] == list(range(1, HELD_AT + 1))
        unconfirmed = in_queue - marked  # in the broker's queue, not marked published

        broker_proxy.release()
        restarted = duplex.start("run", "--concurrency", "8")
        wait_for(
            lambda: (open_work(db) == 0 and counts(db)[1] == 0) or restarted.poll() is not None,
            "the restarted worker to finish the task and publish every event",
            timeout=90,
        )
        assert stop(restarted) == 0, duplex.stderr_text()[-3000:]
        total, left = counts(db)
        assert left == 0, f"{left} event(s) left unpublished after the restart"
        with db.read() as conn:
            completed = conn.execute(
                select(func.count()).where(de.c.name == "step.completed")
            ).scalar_one()
            lost = conn.execute(select(func.count()).where(de.c.name == "step.failed")).scalar_one()
        # A step.completed per step; a step.failed per attempt the kill left running (the
        # gated ones at least), recovered as worker_lost.
        assert completed == KILL_STEPS
        assert lost >= KILL_GATED
        assert total == completed + lost
        after_restart = drain_until(broker_queue, total - len(marked))
        got = before_kill + after_restart
        with db.read() as conn:
            assert {m.message_id for m in got} == set(conn.execute(select(de.c.event_id)).scalars())
        # In order per task (duplicates set aside), from before the kill to after the restart.
        assert first_arrivals(got)[task] == sequences_by_task(db)[task] == list(range(1, total + 1))
        # At least once: what the broker had without a confirm came again, same id, same body.
        bodies = {m.message_id: m.envelope for m in before_kill}
        again = {m.message_id: m.envelope for m in after_restart if m.message_id in unconfirmed}
        assert set(again) == unconfirmed
        assert all(again[i] == bodies[i] for i in unconfirmed)
        # What was confirmed and marked before the kill was not published again.
        assert not {m.message_id for m in after_restart} & marked
    finally:
        db.dispose()


# --- two workers with relays on PostgreSQL --------------------------------------------------


@pytest.mark.postgres
def test_two_workers_with_relays_on_postgres_keep_one_tasks_order(
    tmp_path: Path, broker_queue: BrokerQueue, pg_url: str
) -> None:
    env = relay_env(
        broker_queue,
        DUPLEX_RELAY__ENABLED="true",
        DUPLEX_RELAY__BATCH_SIZE="7",
        DUPLEX_DATABASE__URL=pg_url,
        DUPLEX_EVENT_SYSTEM__DEPLOYMENT_MODE="hybrid",
    )
    first = with_env(make_duplex(tmp_path / "one"), env)
    second = with_env(make_duplex(tmp_path / "two"), env)
    first.ok("migrate")
    task = first.submit(wide_template(tmp_path / "t.toml", 150))
    db = open_db(pg_url)
    processes = [
        first.start("run", "--concurrency", "6"),
        second.start("run", "--concurrency", "6"),
    ]
    try:

        def all_published() -> bool:
            total, left = counts(db)
            return total >= 300 and left == 0

        wait_for(all_published, "every event to be published", timeout=90)
    finally:
        codes = [stop(p) for p in processes]
    try:
        assert codes == [0, 0], (first.stderr_text()[-2000:], second.stderr_text()[-2000:])
        expected = sequences_by_task(db)[task]
        got = drain_until(broker_queue, len(expected))
        assert first_arrivals(got)[task] == expected
        with db.read() as conn:
            stats = [row[0] for row in conn.execute(select(workers.c.stats))]
        published = sum(s.get("relay", {}).get("published", 0) for s in stats)
        assert published >= len(expected)
    finally:
        db.dispose()


# --- duplex relay as a process of its own ---------------------------------------------------


def test_duplex_relay_publishes_what_a_worker_without_relay_committed(
    tmp_path: Path, broker_queue: BrokerQueue
) -> None:
    duplex = with_env(make_duplex(tmp_path), relay_env(broker_queue))
    duplex.ok("migrate")
    task = duplex.submit(wide_template(tmp_path / "t.toml", 5))
    duplex.ok("run", "--until-idle")
    status = json.loads(duplex.ok("status", "--json").stdout)
    assert status["events"]["unpublished"] == 10
    assert "10 unpublished" in duplex.ok("status").stdout
    result = duplex.run("relay", "--until-idle", timeout=60)
    assert result.returncode == 0, result.stderr
    got = drain_until(broker_queue, 10)
    assert first_arrivals(got) == {task: list(range(1, 11))}
    assert json.loads(duplex.ok("status", "--json").stdout)["events"]["unpublished"] == 0


@pytest.mark.postgres
def test_duplex_relay_on_postgres_is_woken_by_notify(
    tmp_path: Path, broker_queue: BrokerQueue, pg_url: str
) -> None:
    """Polling once an hour: the NOTIFY of another process's commit wakes ``duplex relay``."""
    duplex = with_env(
        make_duplex(tmp_path),
        relay_env(
            broker_queue, DUPLEX_DATABASE__URL=pg_url, DUPLEX_RELAY__POLL_INTERVAL_MS="3600000"
        ),
    )
    duplex.ok("migrate")
    relay = duplex.start("relay")
    try:
        wait_for(lambda: "relay connected" in duplex.stderr_text(), "the relay to connect")
        task = duplex.submit(wide_template(tmp_path / "t.toml", 3))
        duplex.ok("run", "--until-idle")
        got = drain_until(broker_queue, 6, timeout_s=20)
        assert first_arrivals(got) == {task: [1, 2, 3, 4, 5, 6]}
    finally:
        assert stop(relay) == 0


def test_duplex_relay_says_in_one_line_that_it_cannot_reach_the_broker(tmp_path: Path) -> None:
    duplex = with_env(
        make_duplex(tmp_path),
        relay_env(None, DUPLEX_RELAY__URL="amqp://guest:guest@127.0.0.1:1/%2F"),
    )
    duplex.ok("migrate")
    process = duplex.start("relay")
    try:
        wait_for(lambda: "cannot reach the broker" in duplex.stderr_text(), "the warning")
        time.sleep(0.5)  # it keeps retrying, and stays alive
        assert process.poll() is None
    finally:
        assert stop(process) == 0
    text = duplex.stderr_text()
    assert text.count("cannot reach the broker") == 1, text
    assert "Connection refused" in text
    assert "Traceback" not in text


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("DUPLEX_RELAY__URL", "http://localhost", "relay.url"),
        ("DUPLEX_RELAY__UNROUTABLE", "drop", "relay.unroutable"),
        ("DUPLEX_RELAY__MAX_ATTEMPTS", "0", "relay.max_attempts"),
        ("DUPLEX_RELAY__EXCHANGE", "amq.topic", "relay.exchange"),
    ],
)
def test_bad_relay_settings_stop_start_up_with_one_line(
    tmp_path: Path, variable: str, value: str, fragment: str
) -> None:
    duplex = make_duplex(tmp_path)
    for command in (["relay"], ["run"]):
        result = duplex.run(*command, env={variable: value, "DUPLEX_RELAY__ENABLED": "true"})
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        assert fragment in lines[0]


# --- duplex events --------------------------------------------------------------------------


def test_duplex_events_follow_shows_events_as_they_commit(tmp_path: Path) -> None:
    duplex = make_duplex(tmp_path)
    duplex.ok("migrate")
    out, err = tmp_path / "follow.out", tmp_path / "follow.err"
    with open(out, "wb") as handle, open(err, "wb") as errors:
        follower = processes.current().popen(
            duplex.command(["events", "--follow", "--json"]),
            cwd=duplex.cwd,
            env=duplex.env,
            stdout=handle,
            stderr=errors,
        )
    try:
        # Following an empty table (or, if it starts late, it prints the history first:
        # the test passes either way).
        time.sleep(0.5)
        task = duplex.submit(wide_template(tmp_path / "t.toml", 6))
        duplex.ok("run", "--until-idle")

        def lines() -> list[dict[str, Any]]:
            return [json.loads(line) for line in out.read_text().splitlines() if line]

        wait_for(lambda: len(lines()) >= 12, "the follower to print 12 events")
        second = duplex.submit(wide_template(tmp_path / "t.toml", 2))
        duplex.ok("run", "--until-idle")
        wait_for(lambda: len(lines()) >= 16, "the follower to print the second task's events")
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 130, err.read_text()
    assert "Traceback" not in err.read_text()
    shown = lines()
    assert len(shown) == 16, shown
    assert [e["sequence"] for e in shown if e["task_uuid"] == task] == list(range(1, 13))
    assert [e["sequence"] for e in shown if e["task_uuid"] == second] == [1, 2, 3, 4]
    assert {e["name"] for e in shown} == {"e2e.echoed", "step.completed"}
    # One task, by sequence; unknown task: one line.
    text = duplex.ok("events", "--task", second).stdout.splitlines()
    assert [line.split()[3] for line in text] == ["#1", "#2", "#3", "#4"]
    bad = duplex.run("events", "--task", "00000000-0000-0000-0000-000000000000")
    assert bad.returncode == 1
    assert bad.stderr.strip().endswith("no task with uuid 00000000-0000-0000-0000-000000000000")


def test_duplex_events_retry_and_skip_settle_dead_letters_and_are_recorded(
    tmp_path: Path,
) -> None:
    duplex = make_duplex(tmp_path)
    duplex.ok("migrate")
    duplex.submit(wide_template(tmp_path / "t.toml", 1))
    duplex.ok("run", "--until-idle")
    db = open_db(f"sqlite:///{duplex.db_path}")
    try:
        with db.write() as conn:
            ids = list(conn.execute(select(de.c.event_id).order_by(de.c.sequence)).scalars())
            conn.execute(
                update(de)
                .values(dead_lettered_at=utcnow(), publish_attempts=5, publish_error="nack")
                .where(de.c.event_id.in_(ids))
            )
        retried = duplex.ok("events", "retry", ids[0], "--reason", "broker fixed")
        assert "will be published again" in retried.stdout
        skipped = duplex.ok("events", "skip", ids[1])
        assert "skipped" in skipped.stdout
        again = duplex.run("events", "skip", ids[1])
        assert again.returncode == 1
        assert "it is skipped, not dead_lettered" in again.stderr
        unknown = duplex.run("events", "retry", "nope")
        assert unknown.stderr.strip() == "duplex: error: no domain event with id nope"
        with db.read() as conn:
            rows = conn.execute(
                select(
                    domain_event_actions.c.event_id,
                    domain_event_actions.c.action,
                    domain_event_actions.c.operator,
                    domain_event_actions.c.reason,
                ).order_by(domain_event_actions.c.id)
            ).all()
            first = conn.execute(select(de).where(de.c.event_id == ids[0])).one()
        assert [(r.event_id, r.action, r.reason) for r in rows] == [
            (ids[0], "retry", "broker fixed"),
            (ids[1], "skip", None),
        ]
        assert all(r.operator.startswith("operator:") for r in rows)
        assert first.dead_lettered_at is None
        assert first.publish_attempts == 0
    finally:
        db.dispose()


# --- duplex prune ---------------------------------------------------------------------------


def test_duplex_prune_dry_run_then_prune(tmp_path: Path) -> None:
    duplex = make_duplex(tmp_path)
    duplex.ok("migrate")
    done = duplex.submit(wide_template(tmp_path / "t.toml", 3))
    duplex.ok("run", "--until-idle")
    db = open_db(f"sqlite:///{duplex.db_path}")
    try:
        kept = duplex.ok("prune", "--older-than", "0s", "--dry-run")
        # Nothing is published (no relay ran): the task's events hold it.
        assert "would delete 0 task(s) with 0 step(s), 0 event(s)" in kept.stdout
        with db.write() as conn:
            conn.execute(update(de).values(published_at=utcnow()))
        dry = duplex.ok("prune", "--older-than", "0s", "--dry-run")
        assert "would delete 1 task(s) with 3 step(s), 6 event(s)" in dry.stdout
        assert counts(db)[0] == 6
        assert duplex.ok("prune", "--older-than", "1d").stdout.startswith("deleted 0 task(s)")
        real = duplex.ok("prune", "--older-than", "0s", "--batch-size", "1")
        assert "deleted 1 task(s) with 3 step(s), 6 event(s)" in real.stdout
        assert counts(db)[0] == 0
        assert duplex.run("status", done).returncode == 1
    finally:
        db.dispose()
    bad = duplex.run("prune", "--older-than", "soon")
    assert bad.returncode == 2
    assert "not a duration: 'soon'" in bad.stderr


def test_migration_numbers_existing_events_in_commit_order(tmp_path: Path) -> None:
    """Rows written before 0005 get sequences by created_at, then insertion order."""
    from alembic import command

    from duplex.storage.migrate import alembic_config

    db = open_db(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        with db.write() as conn:
            command.upgrade(alembic_config(conn), "0004")
        with db.write() as conn:
            conn.exec_driver_sql(
                "INSERT INTO tasks (task_uuid, name, namespace, version, state, context, "
                "created_at, updated_at) VALUES ('t1', 'n', 'default', '1', 'complete', '{}', "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            )
            for event_id, stamp in (
                ("e-late", "2026-01-01 00:00:02"),
                ("e-b", "2026-01-01 00:00:01"),
                ("e-a", "2026-01-01 00:00:01"),
            ):
                conn.exec_driver_sql(
                    "INSERT INTO domain_events (event_id, name, task_uuid, step_uuid, payload, "
                    f"created_at) VALUES ('{event_id}', 'x', 't1', NULL, '{{}}', '{stamp}')"
                )
        with db.write() as conn:
            command.upgrade(alembic_config(conn), "head")
        with db.read() as conn:
            rows = conn.execute(select(de.c.event_id, de.c.sequence).order_by(de.c.sequence))
            assert [tuple(r) for r in rows] == [("e-b", 1), ("e-a", 2), ("e-late", 3)]
    finally:
        db.dispose()


# --- the example consumer -------------------------------------------------------------------


def test_the_example_consumer_gets_the_order_events_once_each(tmp_path: Path) -> None:
    require_rabbitmq()
    from tests.cli.support import ORDER_CONTEXT, REPO_ROOT

    exchange = f"duplex.test.example.{uuid.uuid4().hex[:10]}"
    queue = f"{exchange}.orders"
    duplex = with_env(
        make_duplex(tmp_path, handler_modules=("examples.orders",)),
        relay_env(None, DUPLEX_RELAY__ENABLED="true", DUPLEX_RELAY__EXCHANGE=exchange),
    )
    out = tmp_path / "consumer.out"
    with open(out, "wb") as handle:
        consumer = processes.current().popen(
            [
                duplex.command([])[0],
                str(REPO_ROOT / "examples" / "consumer.py"),
                "--exchange",
                exchange,
                "--queue",
                queue,
                "--idle-timeout",
                "2",
            ],
            cwd=duplex.cwd,
            env=duplex.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: "consumer: bound" in out.read_text(), "the consumer to bind its queue")
        duplex.ok("migrate")
        task = duplex.submit(REPO_ROOT / "examples" / "order_fulfillment.toml", ORDER_CONTEXT)
        db = open_db(f"sqlite:///{duplex.db_path}")
        try:
            run = duplex.run(
                "run", "--until-idle", env={"DUPLEX_RETRY__BACKOFF_BASE_MS": "50"}, timeout=120
            )
            assert run.returncode == 0, run.stderr[-2000:]
            assert counts(db)[1] == 0
            with db.read() as conn:
                first = conn.execute(
                    select(de.c.event_id).where(de.c.name == "stock.reserved")
                ).scalar_one()
        finally:
            db.dispose()
        # Replay one event as the relay would after a crash: same id, same body.
        connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        channel = connection.channel()
        replay = json.dumps(
            {
                "event_id": first,
                "task_uuid": task,
                "sequence": 3,
                "name": "stock.reserved",
                "payload": {},
            }
        )
        channel.basic_publish(
            exchange, "stock.reserved", replay, pika.BasicProperties(message_id=first)
        )
        connection.close()
        assert consumer.wait(30) == 0
    finally:
        if consumer.poll() is None:
            consumer.kill()
        cleanup = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        cleanup.channel().queue_delete(queue)
        cleanup.channel().exchange_delete(exchange)
        cleanup.close()
    text = out.read_text()
    names = [line.split()[0] for line in text.splitlines() if line.startswith(NAMES)]
    assert sorted(names[:2]) == ["payment.charged", "stock.reserved"], text
    assert names[2:] == ["order.shipped", "order.fulfilled"], text
    assert f"duplicate dropped: {first}" in text
    assert f"task {task}" in text


NAMES = ("stock.", "payment.", "order.", "billing.")
