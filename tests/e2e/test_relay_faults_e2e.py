"""The relay's database connection terminated between the broker's confirm and the marking.

Real PostgreSQL, real RabbitMQ, ``duplex relay`` as real processes. The moment is made, not
waited for: the test holds ``LOCK TABLE domain_events IN SHARE ROW EXCLUSIVE MODE``, which lets
the relay select its batch (``FOR UPDATE SKIP LOCKED`` only needs ROW SHARE) and publish it,
but blocks the ``UPDATE`` that marks it published. Once the relay's backend waits on that lock
(``pg_stat_activity``), every message of the batch has been confirmed; the test terminates
that backend (``pg_terminate_backend``) and only then lets go of the lock.

What must hold (docs/relay.md, "Duplicates"): every event reaches the queue, first arrivals are in
sequence order per task, a copy carries the same ``message_id`` and body as the original, and
the number of copies is within the documented bound: none while the relay that confirmed them
lives (it marks them on a new connection before it publishes anything else), at most one batch
when another relay takes the rows over meanwhile.
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import Engine

from duplex.storage.listen import libpq_url
from duplex.storage.models import domain_events
from tests import processes as owned_processes
from tests.cli.support import Duplex, make_duplex
from tests.relay_support import (
    RABBITMQ_URL,
    BrokerQueue,
    Received,
    first_arrivals,
    require_rabbitmq,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
de = domain_events

BATCH = 10
STEPS = 20  # each e2e.echo step commits two events: e2e.echoed and step.completed
WAIT_S = 30.0


# --- fixtures: processes, the lock, the queue -----------------------------------------------


@dataclass
class Processes:
    """Every process a test starts; all are stopped at teardown, also when the test failed."""

    directory: Path
    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, duplex: Duplex, *args: str, env: dict[str, str]) -> None:
        with (
            open(self.directory / f"{name}.stdout", "wb") as out,
            open(self.directory / f"{name}.stderr", "wb") as err,
        ):
            self.started[name] = owned_processes.current().popen(
                duplex.command(args),
                cwd=duplex.cwd,
                env={**duplex.env, **env},
                stdout=out,
                stderr=err,
            )

    def stderr(self, name: str) -> str:
        return (self.directory / f"{name}.stderr").read_text(errors="replace")

    def stop(self, name: str) -> int:
        """SIGTERM, then wait; SIGKILL if it does not go within 15 s."""
        process = self.started[name]
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            raise

    def stop_all(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    owned = Processes(tmp_path)
    yield owned
    owned.stop_all()


@pytest.fixture
def broker_queue() -> Iterator[BrokerQueue]:
    require_rabbitmq()
    queue = BrokerQueue()
    yield queue
    queue.close()


class MarkBlocker:
    """A transaction of the test's own that holds the lock the relay's marking ``UPDATE`` needs."""

    def __init__(self, url: str) -> None:
        self._conn = psycopg.connect(libpq_url(url))

    def hold(self) -> None:
        self._conn.execute("LOCK TABLE domain_events IN SHARE ROW EXCLUSIVE MODE")

    def release(self) -> None:
        self._conn.rollback()

    def close(self) -> None:
        self._conn.close()  # ends the transaction too: never leaves a relay blocked


@pytest.fixture
def blocker(pg_url: str) -> Iterator[MarkBlocker]:
    holder = MarkBlocker(pg_url)
    yield holder
    holder.close()


# --- helpers --------------------------------------------------------------------------------


def wide_template(path: Path, count: int) -> Path:
    steps = "".join(f'\n[[steps]]\nname = "s{i:03d}"\nhandler = "e2e.echo"\n' for i in range(count))
    path.write_text(f'name = "e2e_relay_faults"\n{steps}')
    return path


def with_app_name(url: str, name: str) -> str:
    """``url`` with a libpq ``application_name``: the test finds the relay's backends by it."""
    return f"{url}{'&' if '?' in url else '?'}application_name={name}"


def wait_for(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return found


def marking_blocked(engine: Engine, app_name: str, *, other_than: int = 0) -> list[int]:
    """Backends of ``app_name`` (not ``other_than``) whose marking UPDATE waits on a lock."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT pid FROM pg_stat_activity WHERE application_name = :name "
                "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE domain_events%'"
            ),
            {"name": app_name},
        )
        return [row.pid for row in rows if row.pid != other_than]


def terminate(engine: Engine, pid: int) -> None:
    with engine.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()


def unpublished(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(select(func.count()).where(de.c.published_at.is_(None))).scalar_one()
        )


def event_ids_and_sequences(engine: Engine) -> tuple[set[str], dict[str, list[int]]]:
    with engine.connect() as conn:
        rows = list(conn.execute(select(de.c.event_id, de.c.task_uuid, de.c.sequence)))
    by_task: dict[str, list[int]] = {}
    for row in sorted(rows, key=lambda r: r.sequence):
        by_task.setdefault(row.task_uuid, []).append(row.sequence)
    return {row.event_id for row in rows}, by_task


def read_all(queue: BrokerQueue, expected: set[str], earlier: list[Received]) -> list[Received]:
    """``earlier`` and every message in the queue, once each id in ``expected`` has arrived."""
    got = list(earlier)
    deadline = time.monotonic() + WAIT_S
    while not {m.message_id for m in got} >= expected and time.monotonic() < deadline:
        got += queue.drain()
        time.sleep(0.05)
    return got + queue.drain()


def copies(messages: list[Received]) -> int:
    """How many messages repeat one that arrived before; each must be identical to it."""
    first: dict[str, Received] = {}
    repeated = 0
    for m in messages:
        if m.message_id in first:
            assert m.envelope == first[m.message_id].envelope, "a copy must be the same message"
            assert m.headers == first[m.message_id].headers
            repeated += 1
        else:
            first[m.message_id] = m
    return repeated


def the_database_error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "relay: database error" in line]
    assert all("administrator command" in line for line in lines), stderr
    return lines


@dataclass
class Setup:
    duplex: Duplex
    url: str
    engine: Engine
    relay_env: dict[str, str]


@pytest.fixture
def committed(tmp_path: Path, pg_url: str, broker_queue: BrokerQueue) -> Iterator[Setup]:
    """A PostgreSQL schema whose domain_events hold one task's 40 committed, unpublished events."""
    env = {"DUPLEX_DATABASE__URL": pg_url}
    duplex = make_duplex(tmp_path / "work")
    duplex = Duplex(duplex.cwd, duplex.db_path, duplex.run_log, {**duplex.env, **env})
    duplex.ok("migrate")
    duplex.submit(wide_template(tmp_path / "t.toml", STEPS))
    duplex.ok("run", "--until-idle")  # relay.enabled is false: the events stay unpublished
    engine = create_engine(pg_url)
    assert unpublished(engine) == 2 * STEPS
    relay_env = {
        "DUPLEX_RELAY__URL": RABBITMQ_URL,
        "DUPLEX_RELAY__EXCHANGE": broker_queue.exchange,
        "DUPLEX_RELAY__BATCH_SIZE": str(BATCH),
        "DUPLEX_RELAY__POLL_INTERVAL_MS": "100",
        "DUPLEX_RELAY__BACKOFF_BASE_MS": "20",
        "DUPLEX_RELAY__BACKOFF_MAX_MS": "200",
    }
    try:
        yield Setup(duplex, pg_url, engine, relay_env)
    finally:
        engine.dispose()


def start_relay(setup: Setup, processes: Processes, name: str) -> str:
    """Start ``duplex relay`` whose database connections are named ``<name>-<random>``."""
    app_name = f"{name}-{uuid.uuid4().hex[:8]}"
    env = {**setup.relay_env, "DUPLEX_DATABASE__URL": with_app_name(setup.url, app_name)}
    processes.start(name, setup.duplex, "relay", env=env)
    return app_name


def terminate_between_confirm_and_mark(
    setup: Setup, processes: Processes, blocker: MarkBlocker, queue: BrokerQueue
) -> tuple[str, int, list[Received]]:
    """Start relay ``a``; terminate its connection once its first batch is confirmed.

    Returns the relay's application name, the terminated backend's pid and the messages
    confirmed by then. The blocker still holds the lock: nothing can be marked yet.
    """
    blocker.hold()
    app_name = start_relay(setup, processes, "a")
    (pid,) = wait_for(lambda: marking_blocked(setup.engine, app_name), "relay a's marking to wait")
    # The UPDATE runs only after the last confirm: the whole batch is in the queue.
    confirmed = wait_for(lambda: queue.drain(), "the confirmed batch")
    confirmed += queue.drain()
    assert len(confirmed) == BATCH, [m.envelope["sequence"] for m in confirmed]
    terminate(setup.engine, pid)
    wait_for(lambda: the_database_error_lines(processes.stderr("a")), "relay a to report the error")
    return app_name, pid, confirmed


# --- the tests ------------------------------------------------------------------------------


def test_terminated_connection_between_confirm_and_mark_publishes_no_copy(
    committed: Setup, processes: Processes, blocker: MarkBlocker, broker_queue: BrokerQueue
) -> None:
    """One relay: it keeps what the broker confirmed and marks it on its next connection."""
    app_name, old, confirmed = terminate_between_confirm_and_mark(
        committed, processes, blocker, broker_queue
    )
    # Its next move is the marking again, on a new connection (blocked as before).
    wait_for(
        lambda: marking_blocked(committed.engine, app_name, other_than=old),
        "relay a to mark again",
    )
    meanwhile = broker_queue.drain()
    blocker.release()
    wait_for(lambda: unpublished(committed.engine) == 0, "every event to be published")
    assert processes.stop("a") == 0
    ids, sequences = event_ids_and_sequences(committed.engine)
    got = read_all(broker_queue, ids, confirmed + meanwhile)
    assert {m.message_id for m in got} == ids
    assert first_arrivals(got) == sequences
    duplicates = copies(got)
    print(f"\nterminated connection, one relay: {duplicates} duplicate(s)")
    assert duplicates == 0
    assert len(the_database_error_lines(processes.stderr("a"))) == 1


def test_terminated_connection_then_another_relay_copies_at_most_one_batch(
    committed: Setup, processes: Processes, blocker: MarkBlocker, broker_queue: BrokerQueue
) -> None:
    """Two relays: the other may publish the unmarked batch again (same ids), never more."""
    app_a, old, confirmed = terminate_between_confirm_and_mark(
        committed, processes, blocker, broker_queue
    )
    wait_for(
        lambda: marking_blocked(committed.engine, app_a, other_than=old), "relay a to mark again"
    )
    # The terminated transaction released its row locks: relay b may take the task's head.
    app_b = start_relay(committed, processes, "b")
    wait_for(lambda: marking_blocked(committed.engine, app_b), "relay b's marking to wait")
    again = read_all(broker_queue, {m.message_id for m in confirmed}, [])
    assert [m.message_id for m in again] == [m.message_id for m in confirmed]
    blocker.release()
    wait_for(lambda: unpublished(committed.engine) == 0, "every event to be published")
    assert processes.stop("a") == 0
    assert processes.stop("b") == 0
    ids, sequences = event_ids_and_sequences(committed.engine)
    got = read_all(broker_queue, ids, confirmed + again)
    assert {m.message_id for m in got} == ids
    assert first_arrivals(got) == sequences
    duplicates = copies(got)
    print(f"\nterminated connection, a second relay: {duplicates} duplicate(s)")
    assert 0 < duplicates <= BATCH
    assert Counter(m.message_id for m in got).most_common(1)[0][1] == 2
