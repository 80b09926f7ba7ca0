"""Start-up and stop under faults, end to end: real ``duplex run`` subprocesses, real signals.

Start-up (the migration under its lock, the worker's registration) survives transient
database failures: it retries with backoff, says so in one log line per try, and gives up
with one clear line after ``worker.startup_timeout_s``. A SIGTERM or SIGINT during start-up
ends it promptly with exit 0 and a line saying the worker stopped before serving.

Every moment is made, never waited for: the test holds the migration's advisory lock (or
locks the ``workers`` table) from its own connection, so the workers are provably inside
start-up, blocked, when their backends are terminated or a signal is sent; an import that
blocks on a FIFO the test controls (a handler module's, or the CLI's own through a
``sitecustomize`` hook) holds a worker in its earliest phases. A port bound but not listening
refuses every connection. Every process is killed in the teardown of the fixture that
started it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.listen import libpq_url
from duplex.storage.migrate import upgrade_to_head
from duplex.storage.schema import HEAD_REVISION
from tests import processes
from tests.cli.support import make_duplex
from tests.conftest import (
    POSTGRES_URL,
    create_postgres_schema,
    drop_postgres_schema,
    postgres_schema_url,
    require_postgres,
)
from tests.e2e.support import (
    Cluster,
    Step,
    WorkerProcess,
    assert_each_attempt_ran_at_most_once,
    assert_each_attempt_settled_once,
    settings_toml,
    wait_for,
)

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
HANDLER_MODULE = "tests.e2e_handlers.kills"
# The key of the migration's advisory lock (duplex.storage.migrate).
MIGRATION_LOCK_KEY = 0x6475706C6578
RETRY_LINE = "start-up: "
STOPPED_LINE = "stopped before serving"
# A worker asked to stop during start-up must be gone this soon.
STOP_BOUND_S = 10.0


def short_settings(**worker: Any) -> dict[str, dict[str, Any]]:
    """Settings sections with short liveness and polling periods."""
    return {
        "worker": {
            "max_concurrent_handlers": 2,
            "prefetch": 1,
            "heartbeat_interval_s": 0.5,
            **worker,
        },
        "event_system": {"polling_interval_ms": 100, "claim_timeout_s": 3},
    }


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Build PostgreSQL clusters (a schema, settings, workers); afterwards kill every worker
    and drop every schema, also when the test failed."""
    require_postgres()
    made: list[Cluster] = []
    schemas: list[str] = []

    def make(sections: dict[str, dict[str, Any]], *, migrated: bool = True) -> Cluster:
        schema = create_postgres_schema()
        schemas.append(schema)
        app_name = f"duplex-startup-{uuid.uuid4().hex[:8]}"
        url = f"{postgres_schema_url(schema)}&application_name={app_name}"
        directory = tmp_path / schema
        directory.mkdir()
        all_sections = {
            **sections,
            "worker": {"handler_modules": [HANDLER_MODULE], **sections.get("worker", {})},
            "retry": {"backoff_base_ms": 100, "jitter": 0.0},
            "logging": {"level": "INFO"},
        }
        (directory / "settings.toml").write_text(settings_toml(url, all_sections))
        db = Database(DatabaseSettings(url=postgres_schema_url(schema)))
        if migrated:
            upgrade_to_head(db)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEX_")}
        env.update(
            PYTHONPATH=str(REPO_ROOT),
            PYTHONUNBUFFERED="1",
            KILLS_RUN_LOG=str(directory / "runs.log"),
        )
        sql_conn = psycopg.connect(
            libpq_url(postgres_schema_url(schema)) + "&application_name=duplex-startup-test",
            autocommit=True,
        )
        cluster = Cluster(directory, schema, url, app_name, env, db, sql_conn)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            for worker in cluster.workers:
                worker.kill()
            cluster.sql_conn.close()
            cluster.db.dispose()
        for schema in schemas:
            drop_postgres_schema(schema)


def waiting_backends(cluster: Cluster, *, lock: str) -> set[int]:
    """The workers' backends that wait for a lock: ``advisory`` (the migration's) or the
    ``workers`` table's."""
    if lock == "advisory":
        condition = "l.locktype = 'advisory'"
    else:
        condition = "l.locktype = 'relation' AND l.relation = 'workers'::regclass"
    rows = cluster.sql(
        "SELECT DISTINCT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
        f"WHERE a.application_name = %s AND NOT l.granted AND {condition}",
        [cluster.app_name],
    )
    return {pid for (pid,) in rows}


def wait_for_waiters(
    cluster: Cluster, workers: list[WorkerProcess], *, lock: str, not_in: set[int]
) -> set[int]:
    """Wait until every worker has a backend waiting on ``lock`` that is not in ``not_in``."""
    found: set[int] = set()

    def all_waiting() -> bool:
        for worker in workers:
            assert worker.alive(), f"{worker.name} exited:\n{worker.stderr()}"
        found.clear()
        found.update(waiting_backends(cluster, lock=lock) - not_in)
        return len(found) == len(workers)

    wait_for(all_waiting, f"{len(workers)} workers to wait on the {lock} lock")
    return set(found)


def terminate(cluster: Cluster, pids: set[int]) -> None:
    rows = cluster.sql(
        "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [sorted(pids)]
    )
    assert [ok for (ok,) in rows] == [True] * len(pids)


@pytest.mark.postgres
@pytest.mark.parametrize("migrated", [True, False], ids=["queued-work", "fresh-schema"])
def test_three_workers_survive_connections_terminated_during_start_up(
    make_cluster: Callable[..., Cluster], migrated: bool
) -> None:
    # Work queued before the workers start on a migrated schema; or a fresh schema, which
    # the workers migrate once they get the lock, and work submitted once they serve.
    cluster = make_cluster(short_settings(), migrated=migrated)
    steps = [Step(f"s{i:02d}", ms=50) for i in range(24)]
    task = cluster.submit("queued_before_start", steps) if migrated else ""
    # The test's own connections: one holds the migration's lock, one the workers table
    # (when there is one yet: a fresh schema gets it from the migration).
    migration_lock = psycopg.connect(cluster.conninfo("duplex-startup-lock"), autocommit=True)
    table_lock = psycopg.connect(cluster.conninfo("duplex-startup-table"))
    try:
        migration_lock.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK_KEY])
        if migrated:
            table_lock.execute("LOCK TABLE workers IN EXCLUSIVE MODE")  # reads pass, not inserts
        workers = [cluster.start_worker(name) for name in ("a", "b", "c")]

        # Twice while all three queue on the migration's lock ...
        seen: set[int] = set()
        for _ in range(2):
            waiting = wait_for_waiters(cluster, workers, lock="advisory", not_in=seen)
            terminate(cluster, waiting)
            seen |= waiting
        wait_for_waiters(cluster, workers, lock="advisory", not_in=seen)
        migration_lock.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK_KEY])
        if migrated:
            # ... and once while all three register (their INSERT waits for the table lock).
            waiting = wait_for_waiters(cluster, workers, lock="workers", not_in=seen)
            terminate(cluster, waiting)
            seen |= waiting
            wait_for_waiters(cluster, workers, lock="workers", not_in=seen)
            table_lock.rollback()

        cluster.wait_started(*workers)
        if not migrated:
            task = cluster.submit("submitted_after_start", steps)
        wait_for(lambda: cluster.open_work() == 0, "the task to finish", timeout=60)
        stderrs = {worker.name: worker.stderr() for worker in workers}
        for worker in workers:
            assert worker.terminate() == 0, worker.stderr()
    finally:
        migration_lock.close()
        table_lock.close()

    for name, stderr in stderrs.items():
        assert "Traceback" not in stderr, stderr
        retries = [line for line in stderr.splitlines() if RETRY_LINE in line]
        # Two terminations during the migration, and one during the registration.
        assert len(retries) == (3 if migrated else 2), f"{name}:\n{stderr}"
        assert all("could not bring the database schema to head" in r for r in retries[:2])
        assert all("could not register the worker" in r for r in retries[2:])
        assert "terminating connection due to administrator command" in retries[0], retries
    assert cluster.sql("SELECT version_num FROM alembic_version") == [(HEAD_REVISION,)]
    # Each worker registered once, under its own process.
    rows = cluster.sql("SELECT pid, stopped_at IS NOT NULL FROM workers")
    assert Counter(pid for pid, _ in rows) == Counter(w.pid for w in workers)
    assert all(stopped for _, stopped in rows)
    # Nothing lost: every step ran once and completed.
    states = cluster.sql("SELECT state, attempts FROM workflow_steps WHERE task_uuid = %s", [task])
    assert sorted(states) == [("complete", 1)] * len(steps)
    assert_each_attempt_settled_once(cluster)
    assert len(assert_each_attempt_ran_at_most_once(cluster)) == len(steps)


# --- a stop during start-up -----------------------------------------------------------------


def assert_stopped_before_serving(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert any(
        line.endswith("SIGTERM received during start-up: stopped before serving") for line in lines
    ), stderr
    assert " started: " not in stderr, stderr


@pytest.mark.postgres
def test_sigterm_while_waiting_for_the_migration_lock_stops_before_serving(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(short_settings(), migrated=False)
    migration_lock = psycopg.connect(cluster.conninfo("duplex-startup-lock"), autocommit=True)
    try:
        migration_lock.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK_KEY])
        worker = cluster.start_worker("w")
        wait_for_waiters(cluster, [worker], lock="advisory", not_in=set())
        signalled = time.monotonic()
        worker.popen.send_signal(signal.SIGTERM)
        returncode = worker.popen.wait(timeout=STOP_BOUND_S)
        took = time.monotonic() - signalled
        # Its query was cancelled, not left queued on the lock the test still holds.
        wait_for(
            lambda: (
                not cluster.sql(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                    [cluster.app_name],
                )
            ),
            "the worker's backends to end",
            timeout=5,
        )
    finally:
        migration_lock.close()
    stderr = worker.stderr()
    assert returncode == 0, stderr
    assert_stopped_before_serving(stderr)
    print(f"\n[startup] exit {took:.2f}s after SIGTERM while waiting for the migration lock")
    # Stopped before the migration: the schema is untouched.
    assert cluster.sql("SELECT to_regclass('alembic_version')") == [(None,)]


BLOCKING_MODULE = """\
import os
from pathlib import Path

Path(os.environ["STARTUP_IMPORTING"]).touch()
with open(os.environ["STARTUP_FIFO"]) as fifo:  # blocks until the test opens it
    fifo.read()
"""


def main_thread_waits_for_the_fifo(pid: int) -> bool:
    # The kernel's wait channel of a process blocked in open() on a FIFO without a writer.
    # A kernel that hides it ("0", or no file) leaves only the marker: a signal that lands
    # just before the open() still falls inside the import, which is what is tested.
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return True
    return wchan in ("wait_for_partner", "0", "")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_handler_modules_import_stops_before_serving(
    tmp_path: Path, signum: signal.Signals
) -> None:
    duplex = make_duplex(tmp_path, handler_modules=("blocking_handlers",))
    (tmp_path / "blocking_handlers.py").write_text(BLOCKING_MODULE)
    fifo, importing = tmp_path / "fifo", tmp_path / "importing"
    os.mkfifo(fifo)
    duplex.env.update(STARTUP_FIFO=str(fifo), STARTUP_IMPORTING=str(importing))
    worker = duplex.start("run")

    def blocked() -> bool:
        assert worker.poll() is None, duplex.stderr_text()
        return importing.exists() and main_thread_waits_for_the_fifo(worker.pid)

    wait_for(blocked, "the worker to block importing its handler module")
    signalled = time.monotonic()
    worker.send_signal(signum)
    returncode = worker.wait(timeout=STOP_BOUND_S)
    took = time.monotonic() - signalled
    stderr = duplex.stderr_text()
    assert returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.rstrip().endswith(
        f"{signum.name} received during start-up: stopped before serving"
    ), stderr
    print(f"\n[startup] exit {took:.2f}s after {signum.name} during a blocked import")
    # Stopped before anything touched the database: not even the file was created.
    assert not duplex.db_path.exists()


# Loaded by the interpreter at start (``sitecustomize``), before any of Duplex: the import
# of ``duplex.cli.main`` (SQLAlchemy, the CLI's commands) then blocks on the test's FIFO.
BLOCK_CLI_IMPORT = """\
import os
import sys
from pathlib import Path


class BlockTheCli:
    def find_spec(self, name, path=None, target=None):
        if name == "duplex.cli.main":
            sys.meta_path.remove(self)
            Path(os.environ["STARTUP_IMPORTING"]).touch()
            with open(os.environ["STARTUP_FIFO"]) as fifo:
                fifo.read()
        return None


sys.meta_path.insert(0, BlockTheCli())
"""


@pytest.mark.parametrize("how", ["module", "script"])
def test_a_signal_while_the_cli_itself_imports_is_honoured_once_it_has(
    tmp_path: Path, how: str
) -> None:
    duplex = make_duplex(tmp_path)
    preload = tmp_path / "preload"
    preload.mkdir()
    (preload / "sitecustomize.py").write_text(BLOCK_CLI_IMPORT)
    fifo, importing = tmp_path / "fifo", tmp_path / "importing"
    os.mkfifo(fifo)
    env = {
        **duplex.env,
        "PYTHONPATH": f"{preload}{os.pathsep}{duplex.env['PYTHONPATH']}",
        "STARTUP_FIFO": str(fifo),
        "STARTUP_IMPORTING": str(importing),
    }
    with open(duplex.stderr_path, "wb") as err:
        worker = processes.current().popen(
            duplex.command(["run"], script=how == "script"),
            cwd=duplex.cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )

    def blocked() -> bool:
        assert worker.poll() is None, duplex.stderr_text()
        return importing.exists() and main_thread_waits_for_the_fifo(worker.pid)

    wait_for(blocked, "the worker to block importing the CLI")
    worker.send_signal(signal.SIGTERM)
    # The signal is only recorded while the CLI imports; let the import go on.
    with open(fifo, "w"):
        pass
    returncode = worker.wait(timeout=STOP_BOUND_S)
    stderr = duplex.stderr_text()
    assert returncode == 0, f"exit {returncode}: {stderr}"
    assert "Traceback" not in stderr, stderr
    assert stderr.rstrip().endswith("SIGTERM received during start-up: stopped before serving")
    # Honoured before the handler modules were imported or the database touched.
    assert not duplex.db_path.exists()


def unreachable_database_url(port: int) -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/test"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound by the test but not listening: every connection to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def retry_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if RETRY_LINE in line]


def test_sigterm_while_start_up_retries_ends_the_retry_promptly(
    tmp_path: Path, closed_port: int
) -> None:
    duplex = make_duplex(tmp_path)
    duplex.env.update(
        DUPLEX_DATABASE__URL=unreachable_database_url(closed_port),
        DUPLEX_WORKER__STARTUP_TIMEOUT_S="600",
    )
    worker = duplex.start("run")

    def retrying() -> bool:
        assert worker.poll() is None, duplex.stderr_text()
        return len(retry_lines(duplex.stderr_text())) >= 2

    wait_for(retrying, "start-up to retry")
    signalled = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    returncode = worker.wait(timeout=STOP_BOUND_S)
    took = time.monotonic() - signalled
    stderr = duplex.stderr_text()
    assert returncode == 0, stderr
    assert_stopped_before_serving(stderr)
    assert "Connection refused" in retry_lines(stderr)[0]
    print(f"\n[startup] exit {took:.2f}s after SIGTERM while retrying")


def test_start_up_gives_up_after_the_startup_timeout_with_one_line(
    tmp_path: Path, closed_port: int
) -> None:
    timeout_s = 2.0
    duplex = make_duplex(tmp_path)
    duplex.env.update(
        DUPLEX_DATABASE__URL=unreachable_database_url(closed_port),
        DUPLEX_WORKER__STARTUP_TIMEOUT_S=str(timeout_s),
    )
    started = time.monotonic()
    worker = duplex.start("run")
    returncode = worker.wait(timeout=timeout_s + 30)
    took = time.monotonic() - started
    stderr = duplex.stderr_text()
    assert returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    *log, last = stderr.rstrip().splitlines()
    assert last.startswith("duplex: error: start-up gave up after "), stderr
    assert "(worker.startup_timeout_s = 2): could not bring the database schema to head" in last
    assert "Connection refused" in last
    # It said that it retries, once per try, and kept at it for the whole timeout.
    retries = retry_lines("\n".join(log))
    assert len(retries) >= 3, stderr
    assert all(line.split()[2] == "WARNING" for line in retries), retries
    assert took >= timeout_s
    print(f"\n[startup] gave up {took:.2f}s after spawn, after {len(retries)} retries")


@pytest.mark.postgres
def test_a_database_that_does_not_exist_fails_at_once(tmp_path: Path) -> None:
    require_postgres()
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/duplex_missing_{uuid.uuid4().hex[:8]}"
    duplex = make_duplex(tmp_path)
    duplex.env.update(DUPLEX_DATABASE__URL=url, DUPLEX_WORKER__STARTUP_TIMEOUT_S="600")
    worker = duplex.start("run")
    returncode = worker.wait(timeout=60)
    stderr = duplex.stderr_text()
    assert returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert retry_lines(stderr) == [], stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("duplex: error: database error: connection failed: "), line
    assert "does not exist" in line
