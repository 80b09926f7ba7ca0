"""Observability end to end: real HTTP against a real ``duplex run`` subprocess.

Each worker binds ``observability.http_port = 0`` (a free port, named in its log), so tests
running side by side never collide. Covered: the endpoints in each state (starting, ready,
draining after SIGTERM, database unreachable, an actor dead), metric values after a run with
known outcomes (parsed with ``prometheus_client.parser``), JSON logs of concurrent steps, and
``duplex workers`` with a second worker and a killed one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from tests import processes
from tests.cli.support import Duplex, make_duplex, migrated_file, wait_for
from tests.conftest import POSTGRES_URL, require_postgres

pytestmark = pytest.mark.e2e

OPS_MODULE = "tests.e2e_handlers.ops"
FAULTS_MODULE = "tests.e2e_handlers.faults"
SERVING = re.compile(r"serving http://127\.0\.0\.1:(\d+)/")
EXIT_TIMEOUT_S = 30.0


# --- helpers ------------------------------------------------------------------------------------


def ops_dir(
    directory: Path,
    migrated: Path | None,
    *,
    worker: dict[str, Any] | None = None,
    extra: str = "",
    handler_modules: tuple[str, ...] = (OPS_MODULE,),
) -> Duplex:
    """A working directory whose settings open the observability port on a free port."""
    duplex = make_duplex(directory, handler_modules=handler_modules, worker=worker)
    settings = duplex.cwd / "settings.toml"
    settings.write_text(
        settings.read_text()
        + "\n[observability]\nhttp_port = 0\nqueue_refresh_s = 0\n"
        + "saturation_interval_s = 1\n"
        + extra
    )
    if migrated is not None:
        shutil.copyfile(migrated, duplex.db_path)
    return duplex


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return migrated_file(ops_dir(tmp_path_factory.mktemp("migrated"), None))


def port_of(duplex: Duplex, process: subprocess.Popen[bytes]) -> int:
    """Wait for the worker's log line naming its HTTP port."""
    found: list[int] = []

    def serving() -> bool:
        assert process.poll() is None, f"worker exited early:\n{duplex.stderr_text()}"
        match = SERVING.search(duplex.stderr_text())
        if match:
            found.append(int(match.group(1)))
        return bool(found)

    wait_for(serving, "the worker's HTTP port")
    return found[0]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def get_json(port: int, path: str) -> tuple[int, dict[str, Any]]:
    status, body = get(port, path)
    return status, json.loads(body)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of ``/metrics`` as (name, sorted labels) -> value."""
    status, body = get(port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    """Sum of ``name`` over every sample whose labels include ``labels``."""
    return sum(
        v
        for (n, sample_labels), v in samples.items()
        if n == name and set(labels.items()) <= set(sample_labels)
    )


def stop(process: subprocess.Popen[bytes], duplex: Duplex) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"worker did not stop:\n{duplex.stderr_text()}") from None


def write_template(path: Path, name: str, steps: list[dict[str, Any]]) -> Path:
    parts = [f'name = "{name}"\nversion = "1.0.0"\n']
    for step in steps:
        parts.append("\n[[steps]]\n")
        for key, val in step.items():
            if key == "inputs":
                inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in val.items())
                parts.append(f"inputs = {{ {inner} }}\n")
            else:
                parts.append(f"{key} = {json.dumps(val)}\n")
    path.write_text("".join(parts))
    return path


def task_state(duplex: Duplex, task_uuid: str) -> str:
    rows = duplex.sql("SELECT state FROM tasks WHERE task_uuid = ?", [task_uuid])
    return str(rows[0][0])


# --- the endpoints in each state ----------------------------------------------------------------


def test_endpoints_starting_ready_then_draining_after_sigterm(
    tmp_path: Path, migrated: Path
) -> None:
    duplex = ops_dir(tmp_path / "work", migrated)
    settings = duplex.cwd / "settings.toml"
    settings.write_text(
        settings.read_text().replace("[database]\n", "[database]\nbusy_timeout_ms = 30000\n")
    )
    # Hold SQLite's write lock: the worker's start-up migration waits for it, so the worker
    # is "starting" for as long as the test wants.
    blocker = sqlite3.connect(duplex.db_path, timeout=10, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        process = duplex.start("run")
        port = port_of(duplex, process)
        assert get_json(port, "/health/live") == (200, {"status": "alive"})
        status, ready = get_json(port, "/health/ready")
        assert status == 503, ready
        assert ready["reasons"] == ["worker is starting"]
        status, details = get_json(port, "/health")
        assert (status, details["phase"], details["actors"]) == (503, "starting", {})
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    wait_for(lambda: get(port, "/health/ready")[0] == 200, "ready after start-up")
    status, details = get_json(port, "/health")
    assert status == 200
    assert details["status"] == "ready"
    assert details["phase"] == "running"
    assert set(details["actors"].values()) == {"alive"}
    assert len(details["actors"]) == 6
    assert details["database"] == {"reachable": True, "error": None}
    assert details["slots"]["total"] == 8

    # The step runs until the test opens its gate: the worker drains for as long as the
    # test looks at it.
    gate = tmp_path / "gate"
    template = write_template(
        tmp_path / "slow.toml",
        "slow",
        [
            {
                "name": "slow",
                "handler": "ops.outcome",
                "inputs": {"outcome": "gate", "gate": str(gate)},
            }
        ],
    )
    task = duplex.submit(template)
    wait_for(lambda: get_json(port, "/health")[1]["slots"]["running"] == 1, "the step running")

    process.send_signal(signal.SIGTERM)
    wait_for(lambda: get(port, "/health/ready")[0] == 503, "not ready while draining")
    status, ready = get_json(port, "/health/ready")
    assert "worker is draining" in ready["reasons"], ready
    assert get(port, "/health/live")[0] == 200
    assert value(scrape(port), "duplex_worker_draining") == 1.0
    gate.touch()
    assert process.wait(timeout=EXIT_TIMEOUT_S) == 0, duplex.stderr_text()
    assert task_state(duplex, task) == "complete"


def test_ready_is_503_while_an_actor_is_dead(tmp_path: Path, migrated: Path) -> None:
    duplex = ops_dir(
        tmp_path / "work",
        migrated,
        handler_modules=(OPS_MODULE, FAULTS_MODULE),
        worker={"shutdown_timeout_ms": 120_000},
    )
    # The publisher dies on the first events it is given (after the quick step's commit);
    # the worker then stops in order, waiting for the gated step, and is not ready meanwhile:
    # until the test opens the gate.
    duplex.env["E2E_FAULT"] = "DomainEventPublisher.publish:1"
    gate = tmp_path / "gate"
    template = write_template(
        tmp_path / "two.toml",
        "two",
        [
            {"name": "quick", "handler": "ops.outcome", "inputs": {"outcome": "ok"}},
            {
                "name": "held",
                "handler": "ops.outcome",
                "inputs": {"outcome": "gate", "gate": str(gate)},
            },
        ],
    )
    process = duplex.start("run")
    port = port_of(duplex, process)
    wait_for(lambda: get(port, "/health/ready")[0] == 200, "ready")
    duplex.submit(template)
    wait_for(lambda: get(port, "/health/ready")[0] == 503, "not ready once the actor died")
    status, details = get_json(port, "/health")
    assert status == 503
    assert details["actors"]["DomainEventPublisher"] == "dead", details
    assert any("DomainEventPublisher" in reason for reason in details["reasons"]), details
    gate.touch()
    assert process.wait(timeout=EXIT_TIMEOUT_S) == 1, duplex.stderr_text()


def _postgres_role() -> tuple[str, str]:
    """Create a role and a schema it owns: the worker's connections can be cut off alone."""
    name = f"duplex_ops_{uuid.uuid4().hex[:10]}"
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE ROLE "{name}" LOGIN'))
        conn.execute(text(f'CREATE SCHEMA "{name}" AUTHORIZATION "{name}"'))
    engine.dispose()
    return name, name


def _postgres_admin(*statements: str) -> None:
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
    engine.dispose()


def _cut_off(role: str) -> None:
    _postgres_admin(
        f'ALTER ROLE "{role}" NOLOGIN',
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'",
    )


@pytest.mark.postgres
def test_ready_is_503_while_postgres_is_unreachable(tmp_path: Path) -> None:
    require_postgres()
    role, schema = _postgres_role()
    try:
        duplex = ops_dir(tmp_path / "work", None)
        base = POSTGRES_URL.replace("postgres@", f"{role}@", 1)
        url = f"{base}?options=-csearch_path%3D{schema}"
        settings = duplex.cwd / "settings.toml"
        settings.write_text(
            re.sub(r'url = ".*"', f"url = {json.dumps(url)}", settings.read_text(), count=1)
        )
        process = duplex.start("run")
        port = port_of(duplex, process)
        wait_for(lambda: get(port, "/health/ready")[0] == 200, "ready")

        _cut_off(role)  # every connection terminated, and no new one allowed
        status, ready = get_json(port, "/health/ready")
        assert status == 503, ready
        assert any(reason.startswith("database unreachable") for reason in ready["reasons"])
        status, details = get_json(port, "/health")
        assert details["database"]["reachable"] is False
        assert details["database"]["error"]
        assert get(port, "/health/live")[0] == 200
        assert get(port, "/metrics")[0] == 200  # scrapes still answer, from what is kept

        _postgres_admin(f'ALTER ROLE "{role}" LOGIN')
        wait_for(lambda: get(port, "/health/ready")[0] == 200, "ready once it answers again")
        assert stop(process, duplex) == 0, duplex.stderr_text()
    finally:
        _postgres_admin(
            f'ALTER ROLE "{role}" NOLOGIN',
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'",
            f'DROP SCHEMA IF EXISTS "{schema}" CASCADE',
            f'DROP ROLE IF EXISTS "{role}"',
        )


def test_a_port_in_use_is_one_line_naming_it(tmp_path: Path, migrated: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        duplex = ops_dir(tmp_path / "work", migrated)
        for env, fragment in (
            ({"DUPLEX_OBSERVABILITY__HTTP_PORT": str(port)}, f"127.0.0.1:{port}"),
            (
                {"DUPLEX_OBSERVABILITY__HTTP_HOST": "no-such-host.invalid"},
                "no-such-host.invalid",
            ),
        ):
            result = duplex.run("run", "--until-idle", env=env)
            assert result.returncode == 1, result.stderr
            assert "Traceback" not in result.stderr
            errors = result.stderr.splitlines()
            assert len(errors) == 1, result.stderr
            assert "observability.http_host/http_port: cannot listen on" in errors[0]
            assert fragment in errors[0], errors[0]


# --- metric values after a run with known outcomes ---------------------------------------------

KNOWN_OUTCOMES: list[dict[str, Any]] = [
    {"name": "ok1", "handler": "ops.outcome", "inputs": {"outcome": "ok"}},
    {"name": "ok2", "handler": "ops.outcome", "inputs": {"outcome": "ok"}},
    {"name": "ok3", "handler": "ops.outcome", "inputs": {"outcome": "ok"}},
    {"name": "perm", "handler": "ops.outcome", "inputs": {"outcome": "permanent"}},
    {"name": "err", "handler": "ops.outcome", "max_attempts": 1, "inputs": {"outcome": "error"}},
    {
        "name": "hang",
        "handler": "ops.outcome",
        "max_attempts": 1,
        "timeout_ms": 300,
        "inputs": {"outcome": "hang"},
    },
    {"name": "flaky", "handler": "ops.outcome", "max_attempts": 2, "inputs": {"outcome": "flaky"}},
]


def test_metrics_match_a_run_with_known_outcomes(tmp_path: Path, migrated: Path) -> None:
    duplex = ops_dir(tmp_path / "work", migrated)
    template = write_template(tmp_path / "known.toml", "known", KNOWN_OUTCOMES)
    process = duplex.start("run")
    port = port_of(duplex, process)
    task = duplex.submit(template)

    def settled() -> bool:
        states = {state for state, _ in duplex.step_states(task).values()}
        return states <= {"complete", "error"}

    wait_for(settled, "every step settled")
    # The hung handler returns once cancelled; its late result is rejected by the guard.
    ns = {"namespace": "default"}
    wait_for(
        lambda: value(scrape(port), "duplex_late_results_rejected_total", **ns) == 1,
        "the timed-out handler's late result rejected",
    )
    m = scrape(port)
    h = {"namespace": "default", "handler": "ops.outcome"}
    assert value(m, "duplex_steps_claimed_total", **ns) == 8  # 7 steps, flaky twice
    assert value(m, "duplex_steps_succeeded_total", **h) == 4
    failed = {
        labels["error_type"]: v
        for (name, key), v in m.items()
        if name == "duplex_steps_failed_total"
        for labels in [dict(key)]
    }
    assert failed == {
        "permanent_error": 1,
        "handler_error": 1,
        "handler_timeout": 1,
        "retryable_error": 1,
    }
    assert value(m, "duplex_step_retries_scheduled_total", **h) == 1
    assert value(m, "duplex_handler_timeouts_total") == 1
    # Every attempt a handler really ran (all but the timed-out one) is in the histograms.
    assert value(m, "duplex_handler_duration_seconds_count", **h) == 7
    for latency in (
        "duplex_claim_to_start_seconds",
        "duplex_submit_to_start_seconds",
        "duplex_handler_end_to_commit_seconds",
    ):
        assert value(m, f"{latency}_count", **ns) == 7, latency
        assert value(m, f"{latency}_bucket", le="+Inf", **ns) == 7, latency
    assert value(m, "duplex_commit_batch_size_sum") == 9  # 8 results and the late one
    assert value(m, "duplex_commit_failures_total") == 0
    (events,) = duplex.sql("SELECT count(*) FROM domain_events WHERE task_uuid = ?", [task])
    wait_for(
        lambda: value(scrape(port), "duplex_domain_events_delivered_total") == events[0],
        "every committed event delivered",
    )
    m = scrape(port)
    assert events[0] == 8  # step.completed / step.failed per committed attempt
    assert value(m, "duplex_domain_events_dropped_total") == 0
    assert value(m, "duplex_subscriber_errors_total") == 0
    assert value(m, "duplex_ready_steps", **ns) == 0
    assert value(m, "duplex_handler_slots") == 8
    assert value(m, "duplex_handlers_running") == 0
    assert value(m, "duplex_handler_slots_free") == 8
    assert value(m, "duplex_abandoned_threads") == 0
    ((worker_id,),) = duplex.sql("SELECT worker_id FROM workers")
    info = [key for (name, key) in m if name == "duplex_worker_info"]
    assert len(info) == 1
    assert dict(info[0])["worker_id"] == worker_id
    assert dict(info[0])["version"] == "0.1.0"
    assert value(m, "duplex_worker_uptime_seconds") > 0
    assert stop(process, duplex) == 0, duplex.stderr_text()


def test_queue_metrics_count_ready_steps_per_namespace(tmp_path: Path, migrated: Path) -> None:
    # One slot, busy until the test opens the gate: the other steps stay ready, the oldest
    # ages, and the pool stays saturated.
    duplex = ops_dir(
        tmp_path / "work", migrated, worker={"max_concurrent_handlers": 1, "prefetch": 0}
    )
    gate = tmp_path / "gate"
    steps = [
        {
            "name": f"s{i}",
            "handler": "ops.outcome",
            "inputs": {"outcome": "gate", "gate": str(gate)},
        }
        for i in range(4)
    ]
    template = write_template(tmp_path / "queue.toml", "queue", steps)
    process = duplex.start("run")
    port = port_of(duplex, process)
    duplex.submit(template)
    wait_for(lambda: value(scrape(port), "duplex_handlers_running") == 1, "one step running")
    time.sleep(0.3)  # let the oldest ready step age measurably
    m = scrape(port)
    assert value(m, "duplex_ready_steps", namespace="default") == 3
    assert value(m, "duplex_oldest_ready_step_age_seconds", namespace="default") >= 0.3
    assert value(m, "duplex_handler_slots_free") == 0
    # Saturated (one slot, busy all along, steps waiting in SQL): one line per interval (1 s),
    # with the figures, however many polls and claims happened meanwhile.
    started = time.monotonic()
    wait_for(lambda: "saturated: all 1 handler slots busy" in duplex.stderr_text(), "a warning")
    lines = [line for line in duplex.stderr_text().splitlines() if "saturated:" in line]
    assert "ready in SQL" in lines[0], lines
    assert len(lines) <= 2 + (time.monotonic() - started), lines
    gate.touch()
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=EXIT_TIMEOUT_S) == 0, duplex.stderr_text()


# --- JSON logs -----------------------------------------------------------------------------------


def test_json_logs_carry_the_step_fields_of_concurrent_steps(
    tmp_path: Path, migrated: Path
) -> None:
    duplex = ops_dir(
        tmp_path / "work",
        migrated,
        worker={"max_concurrent_handlers": 5},
    )
    settings = duplex.cwd / "settings.toml"
    settings.write_text(
        settings.read_text().replace('level = "INFO"', 'level = "INFO"\nserialize = true')
    )
    steps: list[dict[str, Any]] = [
        {"name": f"log{i}", "handler": "ops.log", "inputs": {"lines": 8, "lockstep": 4}}
        for i in range(4)
    ]
    steps.append(
        {
            "name": "hang",
            "handler": "ops.outcome",
            "max_attempts": 1,
            "timeout_ms": 200,
            "inputs": {"outcome": "hang"},
        }
    )
    template = write_template(tmp_path / "logs.toml", "logs", steps)
    task = duplex.submit(template)
    result = duplex.run("run", "--until-idle")
    assert result.returncode == 0, result.stderr
    # Piped: plain progress lines, and the closing summary.
    assert result.stdout.splitlines()[-1].startswith(
        "done: 5 attempt(s) committed (4 succeeded, 1 failed)"
    ), result.stdout
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    uuids = {
        name: u
        for u, name in duplex.sql(
            "SELECT step_uuid, name FROM workflow_steps WHERE task_uuid = ?", [task]
        )
    }
    ((worker_id,),) = duplex.sql("SELECT worker_id FROM workers")
    handler_lines = [r for r in records if r["message"].startswith("ops.log ")]
    assert len(handler_lines) == 32
    order = []
    for record in handler_lines:
        name = record["message"].split()[1]
        order.append(name)
        assert record["step_name"] == name, record
        assert record["step_uuid"] == uuids[name], record
        assert record["task_uuid"] == task, record
        assert record["attempt"] == 1, record
        assert record["worker_id"] == worker_id, record
        assert record["level"] == "INFO"
        assert record["time"].endswith("+00:00")
    # The steps ran side by side, writing in rounds (lockstep): each round of four lines
    # has one line of each step.
    assert all(
        sorted(order[i : i + 4]) == ["log0", "log1", "log2", "log3"] for i in range(0, 32, 4)
    ), order
    (timeout_line,) = [r for r in records if "timed out after" in r["message"]]
    assert timeout_line["step_uuid"] == uuids["hang"]
    assert timeout_line["step_name"] == "hang"
    assert timeout_line["worker_id"] == worker_id
    assert timeout_line["task_uuid"] == task


# --- duplex workers ------------------------------------------------------------------------------


def test_workers_lists_a_second_worker_and_marks_a_killed_one_presumed_dead(
    tmp_path: Path, migrated: Path
) -> None:
    fast_beat = {"heartbeat_interval_s": 0.2}
    first = ops_dir(tmp_path / "one", migrated, worker=fast_beat)
    second = ops_dir(tmp_path / "two", None, worker=fast_beat)
    # The second worker shares the first one's database.
    settings = second.cwd / "settings.toml"
    settings.write_text(settings.read_text().replace(str(second.db_path), str(first.db_path)))
    one, two = first.start("run"), second.start("run")
    ports = {one.pid: port_of(first, one), two.pid: port_of(second, two)}

    def listed() -> dict[int, dict[str, Any]]:
        rows = json.loads(first.ok("workers", "--json").stdout)
        return {row["pid"]: row for row in rows}

    def beaten() -> bool:  # read straight from SQL: cheaper than a CLI run per poll
        rows = first.sql("SELECT stats FROM workers WHERE stopped_at IS NULL")
        return len(rows) == 2 and all("version" in json.loads(stats) for (stats,) in rows)

    wait_for(beaten, "both workers' first heartbeat")
    workers = listed()
    assert {p: w["state"] for p, w in workers.items()} == {one.pid: "alive", two.pid: "alive"}
    table = first.ok("workers").stdout
    for _pid, worker in workers.items():
        (line,) = [line for line in table.splitlines() if worker["worker_id"] in line]
        for fragment in (" alive ", "/8 ", "0.1.0"):
            assert fragment in line, line

    template = write_template(
        tmp_path / "hang.toml",
        "hang",
        [
            {
                "name": "hang",
                "handler": "ops.outcome",
                "max_attempts": 1,  # recovered as worker_lost for good: nothing runs after
                "inputs": {"outcome": "sleep", "seconds": 60},
            }
        ],
    )
    task = first.submit(template)

    def claimant() -> str | None:
        rows = first.sql(
            "SELECT claimed_by FROM workflow_steps WHERE task_uuid = ? AND state = 'in_progress'",
            [task],
        )
        return rows[0][0] if rows else None

    wait_for(lambda: claimant() is not None, "the step claimed")
    victim_id = claimant()
    assert victim_id is not None
    victim, survivor = (one, two) if workers[one.pid]["worker_id"] == victim_id else (two, one)
    victim.kill()
    victim.wait()

    workers = listed()
    assert workers[victim.pid]["state"] == "presumed dead"
    assert f"process {victim.pid} is gone" in workers[victim.pid]["why"]
    assert workers[survivor.pid]["state"] == "alive"
    table = first.ok("workers").stdout
    (line,) = [line for line in table.splitlines() if victim_id in line]
    assert "presumed dead" in line, table
    # The survivor recovers the dead worker's running attempt at once (same host).
    port = ports[survivor.pid]
    wait_for(
        lambda: (
            value(scrape(port), "duplex_stale_claims_recovered_total", namespace="default") == 1
        ),
        "the lost attempt recovered",
    )
    assert (
        value(
            scrape(port),
            "duplex_steps_failed_total",
            namespace="default",
            handler="ops.outcome",
            error_type="worker_lost",
        )
        == 1
    )
    survivor.send_signal(signal.SIGINT)
    assert survivor.wait(timeout=EXIT_TIMEOUT_S) == 0
    workers = listed()
    assert workers[survivor.pid]["state"] == "stopped"


def on_terminal(duplex: Duplex, args: list[str], *, columns: int = 120) -> tuple[int, str]:
    """Run a duplex command with stdout on a pseudo-terminal of ``columns``; return its exit
    code and what it drew."""
    import fcntl
    import pty
    import struct
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    try:
        process = processes.current().popen(
            duplex.command(args),
            cwd=duplex.cwd,
            env={**duplex.env, "TERM": "xterm"},
            stdout=secondary,
            stderr=subprocess.DEVNULL,
        )
        os.close(secondary)
        output = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal closed: the process exited
                break
            if not chunk:
                break
            output += chunk
        code = process.wait(timeout=EXIT_TIMEOUT_S)
    finally:
        os.close(primary)
    return code, output.decode(errors="replace")


def test_run_until_idle_on_a_terminal_draws_a_progress_bar(tmp_path: Path, migrated: Path) -> None:
    duplex = ops_dir(tmp_path / "work", migrated)
    template = write_template(
        tmp_path / "bar.toml",
        "bar",
        [{"name": f"s{i}", "handler": "ops.outcome"} for i in range(3)],
    )
    duplex.submit(template)
    code, screen = on_terminal(duplex, ["run", "--until-idle"])
    assert code == 0
    assert "run --until-idle" in screen
    assert "━" in screen  # the bar
    assert "3/3" in screen
    assert "done: 3 attempt(s) committed (3 succeeded, 0 failed)" in screen


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_status_fits_the_terminal_and_watch_draws_a_progress_bar(
    tmp_path: Path, migrated: Path
) -> None:
    duplex = ops_dir(tmp_path / "work", migrated)
    long_name = "a_step_with_a_rather_long_name_that_will_not_fit_" * 2
    template = write_template(
        tmp_path / "wide.toml",
        "wide",
        [
            {"name": long_name, "handler": "ops.outcome"},
            {"name": "second", "handler": "ops.outcome", "depends_on": [long_name]},
        ],
    )
    task = duplex.submit(template)
    piped = duplex.ok("status", task).stdout
    assert max(len(line) for line in piped.splitlines()) > 100  # piped: never cut
    assert long_name in piped
    code, screen = on_terminal(duplex, ["status", task], columns=60)
    assert code == 0
    lines = [ANSI.sub("", line) for line in screen.splitlines()]
    assert max(len(line.rstrip()) for line in lines) <= 60, lines
    assert any("enqueued" in line for line in lines)

    duplex.ok("run", "--until-idle")
    code, screen = on_terminal(duplex, ["status", task, "--watch", "--interval", "0.1"])
    assert code == 0  # the task is finished: one frame, then exit
    assert "━" in screen
    assert "2/2 complete, 0 running, 0 failed" in ANSI.sub("", screen)
