"""``Client``: submitting from other programs, on SQLite and PostgreSQL.

Idempotency keys are unique per template name: the same key again returns the existing task
and writes nothing, also when several submitters race with the same keys.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from duplex import Client
from duplex.clock import utcnow
from duplex.errors import InputError, SchemaNotReadyError
from duplex.intake.wake import bind_wake_socket
from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.models import tasks, workflow_step_edges, workflow_steps
from duplex.storage.workers import record_wake_address, register_worker
from duplex.templates import TaskTemplate

TEMPLATE = TaskTemplate.model_validate(
    {
        "name": "client_test",
        "steps": [
            {"name": "a", "handler": "t.a"},
            {"name": "b", "handler": "t.b", "depends_on": ["a"]},
        ],
    }
)
OTHER = TaskTemplate.model_validate({"name": "other", "steps": [{"name": "a", "handler": "t.a"}]})


def count(db: Database, table: object) -> int:
    with db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def test_submit_writes_a_task(db: Database) -> None:
    client = Client(db)
    task_uuid = client.submit(TEMPLATE, {"order": 1})
    with db.read() as conn:
        task = conn.execute(select(tasks).where(tasks.c.task_uuid == task_uuid)).one()
        steps = {r.name: r.state for r in conn.execute(select(workflow_steps))}
    assert (task.name, task.state, task.context, task.idempotency_key) == (
        "client_test",
        "pending",
        {"order": 1},
        None,
    )
    assert steps == {"a": "enqueued", "b": "pending"}
    assert count(db, workflow_step_edges) == 1


def test_the_same_key_returns_the_existing_task_and_writes_nothing(db: Database) -> None:
    client = Client(db)
    first = client.submit(TEMPLATE, {"n": 1}, idempotency_key="order-7")
    again = client.submit(TEMPLATE, {"n": 2}, idempotency_key="order-7")
    elsewhere = client.submit(OTHER, {}, idempotency_key="order-7")  # unique per template
    assert again == first
    assert elsewhere != first
    assert count(db, tasks) == 2
    assert count(db, workflow_steps) == 3
    assert client.find("client_test", "order-7") == first
    assert client.find("client_test", "order-8") is None


def test_submit_many_writes_every_task_in_one_go(db: Database) -> None:
    client = Client(db)
    uuids = client.submit_many(TEMPLATE, [{"i": i} for i in range(1500)])
    assert len(set(uuids)) == 1500
    assert count(db, tasks) == 1500
    assert count(db, workflow_steps) == 3000
    assert count(db, workflow_step_edges) == 1500
    with db.read() as conn:
        contexts = dict(conn.execute(select(tasks.c.task_uuid, tasks.c.context)).all())
    assert [contexts[u]["i"] for u in uuids] == list(range(1500))  # UUIDs come back in order


def test_submit_many_with_keys_repeated_within_and_across_calls(db: Database) -> None:
    client = Client(db)
    earlier = client.submit(TEMPLATE, {}, idempotency_key="k1")
    uuids = client.submit_many(
        TEMPLATE, [{}, {}, {}, {}], idempotency_keys=["k1", "k2", "k2", None]
    )
    assert uuids[0] == earlier
    assert uuids[1] == uuids[2] != uuids[3]
    assert count(db, tasks) == 3


def test_racing_submitters_with_the_same_keys_create_each_task_once(db: Database) -> None:
    keys = [f"key-{i}" for i in range(20)]
    results: list[list[str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def submitter() -> None:
        client = Client(db)
        try:
            start.wait()
            results.append(client.submit_many(TEMPLATE, [{} for _ in keys], idempotency_keys=keys))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submitter) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(results) == 4
    assert all(r == results[0] for r in results)
    assert count(db, tasks) == len(keys)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batches=st.lists(st.lists(st.sampled_from("abcde") | st.none(), max_size=6), max_size=5))
def test_keys_map_to_one_task_each_whatever_the_batches(
    tmp_path_factory: pytest.TempPathFactory, batches: list[list[str | None]]
) -> None:
    from tests.conftest import sqlite_database

    db = sqlite_database(tmp_path_factory.mktemp("keys") / "k.db")
    try:
        client = Client(db)
        seen: dict[str, str] = {}
        keyless = 0
        for keys in batches:
            uuids = client.submit_many(TEMPLATE, [{} for _ in keys], idempotency_keys=keys)
            for key, task_uuid in zip(keys, uuids, strict=True):
                if key is None:
                    keyless += 1
                    assert task_uuid not in seen.values()
                else:
                    assert seen.setdefault(key, task_uuid) == task_uuid
        assert count(db, tasks) == len(seen) + keyless
    finally:
        db.dispose()


def test_bad_input_is_refused_and_nothing_written(db: Database) -> None:
    client = Client(db)
    with pytest.raises(InputError, match="JSON object"):
        client.submit_many(TEMPLATE, [{}, ["not", "an", "object"]])  # type: ignore[list-item]
    with pytest.raises(InputError, match="2 idempotency key"):
        client.submit_many(TEMPLATE, [{}], idempotency_keys=["a", "b"])
    assert count(db, tasks) == 0


def test_a_database_without_the_schema_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SchemaNotReadyError):
        Client(f"sqlite:///{tmp_path / 'empty.db'}")


def test_client_from_a_url_loads_templates_by_path(tmp_path: Path) -> None:
    from tests.conftest import sqlite_database

    sqlite_database(tmp_path / "d.db").dispose()
    path = tmp_path / "t.toml"
    path.write_text('name = "from_file"\n[[steps]]\nname = "a"\nhandler = "t.a"\n')
    with Client(f"sqlite:///{tmp_path / 'd.db'}") as client:
        task_uuid = client.submit(path, {"x": 1})
    db = Database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'd.db'}"))
    try:
        with db.read() as conn:
            assert conn.execute(select(tasks.c.name)).scalar_one() == "from_file"
            assert conn.execute(select(tasks.c.task_uuid)).scalar_one() == task_uuid
    finally:
        db.dispose()


def test_a_submission_on_sqlite_wakes_this_hosts_live_workers(sqlite_db: Database) -> None:
    """After its commit, one datagram naming the task's namespace to each worker's address; a
    worker that is gone costs nothing and fails nothing."""
    listening, address, _ = bind_wake_socket()
    listening.setblocking(False)
    with sqlite_db.write() as conn:
        for worker_id, wake_address in (("gone", "@duplex-wake-gone"), ("live", address)):
            register_worker(
                conn, worker_id, hostname=socket.gethostname(), pid=os.getpid(), now=utcnow()
            )
            record_wake_address(conn, worker_id, wake_address)
    try:
        with Client(sqlite_db) as client:
            client.submit(TEMPLATE, {})
            assert listening.recv(100) == b"default"  # "gone" (sent to first) was passed
            client.submit_many(OTHER, [{}, {}])  # one datagram per submission
            assert listening.recv(100) == b"default"
            with pytest.raises(BlockingIOError):
                listening.recv(100)
    finally:
        listening.close()
