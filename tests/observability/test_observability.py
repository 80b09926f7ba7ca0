"""Unit tests of the observability logic, no worker: metrics, health, saturation, logs,
liveness, and the HTTP app and server."""

from __future__ import annotations

import io
import json
import threading
import urllib.request
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from loguru import logger
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from duplex.commit.buffer import CommitBuffer
from duplex.dispatch.pool import HandlerPool
from duplex.errors import ConfigurationError
from duplex.messages import ClaimedStep, StepFailure, StepOutcome
from duplex.observability.counters import EventCounts, Histogram, StepMetrics
from duplex.observability.http import HttpServer, make_app
from duplex.observability.logs import _json_format, step_log
from duplex.observability.metrics import CommitFigures, DuplexCollector, WorkerMetrics
from duplex.observability.queue import QueueFigures, QueueProbe
from duplex.observability.saturation import Sample, SaturationMonitor, sample_of
from duplex.storage.db import Database
from duplex.storage.queries import ready_queue
from duplex.storage.results import CommitReport
from duplex.storage.submission import create_task
from duplex.storage.workers import judge
from duplex.templates import parse_template
from duplex.worker.health import (
    HealthSnapshot,
    database_error,
    details,
    gather,
    readiness,
)

T0 = datetime(2026, 12, 2, 6, 0, tzinfo=UTC)


def step(name: str = "s", *, handler: str = "h", attempt: int = 1) -> ClaimedStep:
    return ClaimedStep(
        step_uuid=f"uuid-{name}",
        task_uuid="task-1",
        name=name,
        handler=handler,
        attempt=attempt,
        max_attempts=3,
        retryable=True,
        timeout_ms=None,
        claimed_by="w1",
        namespace="ns",
        claimed_at=T0,
        submitted_at=T0 - timedelta(seconds=2),
    )


def outcome(s: ClaimedStep, *, error_type: str | None = None, ran_s: float = 0.5) -> StepOutcome:
    started = T0 + timedelta(seconds=0.1)
    finished = started + timedelta(seconds=ran_s)
    if error_type is None:
        return StepOutcome(s, started, finished, result={})
    return StepOutcome(s, started, finished, failure=StepFailure(error_type, "x", retryable=True))


# --- metrics ---------------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(v)
    buckets, total = h.cumulative()
    assert buckets == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert total == pytest.approx(8.65)


def test_step_metrics_count_outcomes_and_leave_synthetic_ones_out_of_latencies() -> None:
    m = StepMetrics()
    ok, failed, timed_out = step("a"), step("b"), step("c")
    report = CommitReport(
        applied=[
            outcome(ok),
            outcome(failed, error_type="handler_error"),
            outcome(timed_out, error_type="handler_timeout"),
        ],
        rejected=[outcome(step("d"))],
        retrying=[outcome(failed, error_type="handler_error")],
    )
    m.committed(report, T0 + timedelta(seconds=1))
    assert m.succeeded.snapshot() == {("ns", "h"): 1}
    assert m.failed.snapshot() == {
        ("ns", "h", "handler_error"): 1,
        ("ns", "h", "handler_timeout"): 1,
    }
    assert m.retries.snapshot() == {("ns", "h"): 1}
    assert m.rejected.snapshot() == {("ns",): 1}
    (hist,) = [h for _, h in m.handler_seconds.snapshot()]
    assert sum(hist.counts) == 2
    assert hist.total == pytest.approx(1.0)
    (claim,) = [h for _, h in m.claim_to_start.snapshot()]
    assert claim.total == pytest.approx(0.2)  # 0.1 s each, for the two handler-run attempts
    (submit,) = [h for _, h in m.submit_to_start.snapshot()]
    assert submit.total == pytest.approx(4.2)
    (commit,) = [h for _, h in m.end_to_commit.snapshot()]
    assert commit.total == pytest.approx(0.8)
    assert m.batch_size.cumulative()[1] == 4


def test_recovered_attempts_are_counted_as_recovered_not_as_a_batch() -> None:
    m = StepMetrics()
    report = CommitReport(applied=[outcome(step("a"), error_type="worker_lost")])
    m.committed(report, T0, recovery=True)
    assert m.recovered.snapshot() == {("ns",): 1}
    assert m.batch_size.cumulative()[1] == 0
    assert m.handler_seconds.snapshot() == []


def test_collector_output_parses_with_prefix_and_labels() -> None:
    queue = QueueProbe(lambda: QueueFigures({"ns": 4}, {"ns": 2.5}), refresh_s=0)
    metrics = WorkerMetrics("w1", hostname="host-a", queue=queue)
    metrics.claimed.inc(("ns",), 3)
    metrics.steps.committed(CommitReport(applied=[outcome(step("a"))]), T0 + timedelta(seconds=1))
    registry = CollectorRegistry()
    registry.register(DuplexCollector(metrics))
    from prometheus_client import generate_latest

    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    assert all(name.startswith("duplex_") for name in families)
    (claimed,) = families["duplex_steps_claimed"].samples
    assert (claimed.labels, claimed.value) == ({"namespace": "ns"}, 3)
    (info,) = families["duplex_worker_info"].samples
    assert info.labels["worker_id"] == "w1"
    assert info.labels["host"] == "host-a"
    (ready,) = families["duplex_ready_steps"].samples
    assert ready.value == 4
    assert families["duplex_handler_duration_seconds"].type == "histogram"


def test_queue_probe_reads_at_most_once_per_interval_and_survives_errors() -> None:
    now = [0.0]
    reads: list[int] = []
    fail = [False]

    def read() -> QueueFigures:
        reads.append(1)
        if fail[0]:
            raise RuntimeError("database down")
        return QueueFigures({"ns": len(reads)}, {})

    probe = QueueProbe(read, refresh_s=5.0, clock=lambda: now[0])
    assert probe.figures() == QueueFigures({"ns": 1}, {})
    now[0] = 4.9
    assert probe.figures() == QueueFigures({"ns": 1}, {})  # cached
    assert len(reads) == 1
    now[0], fail[0] = 5.0, True
    assert probe.figures() == QueueFigures({"ns": 1}, {})  # the last figures, kept
    assert probe.errors == 1
    assert probe.figures() is not None
    assert len(reads) == 2


def attached_metrics(*, queue: QueueProbe | None = None) -> WorkerMetrics:
    """A view with a pool of 3 (one running, one abandoned thread, one claim waiting), a
    buffer holding one result, and events counted."""
    metrics = WorkerMetrics("w1", hostname="host-a", queue=queue)
    pool = HandlerPool(3)
    for _ in range(3):
        pool.new_worker_id()
    pool.enqueue([step("a"), step("b")])
    (run,) = pool.assign(30.0)[:1]
    pool.time_out(run.worker_id, run.step.step_uuid, run.step.attempt)
    pool.enqueue([step("c")])
    buffer = CommitBuffer(10)
    buffer.add(outcome(step("d")))
    events = EventCounts()
    events.add("published")
    events.add("dropped")
    events.watch_queue(lambda: 4)
    metrics.attach(pool=pool, buffer=buffer, events=events)
    return metrics


def test_the_view_reads_the_attached_state_and_nothing_before() -> None:
    metrics = WorkerMetrics("w1")
    assert (metrics.slots(), metrics.commit(), metrics.event_counts()) == (None, None, None)
    assert metrics.queue_figures() is None
    assert metrics.ready_steps() is None
    assert not metrics.draining()
    metrics = attached_metrics(
        queue=QueueProbe(lambda: QueueFigures({"a": 2, "b": 3}, {}), refresh_s=0)
    )
    slots = metrics.slots()
    assert slots is not None
    assert (slots.total, slots.running, slots.waiting, slots.abandoned_threads) == (3, 1, 1, 1)
    assert slots.timeouts == 1
    assert metrics.commit() == CommitFigures(awaiting=1, batch_size=10, failing=False)
    assert metrics.event_counts() == {
        "published": 1,
        "delivered": 0,
        "dropped": 1,
        "subscriber_errors": 0,
        "queued": 4,
    }
    assert metrics.ready_steps() == 5


def test_the_scrape_shows_the_attached_state() -> None:
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    registry.register(DuplexCollector(attached_metrics()))
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }

    def value(name: str) -> float:
        return float(families[name].samples[0].value)

    assert value("duplex_handler_slots") == 3
    assert value("duplex_handlers_running") == 1
    assert value("duplex_abandoned_threads") == 1
    assert value("duplex_results_awaiting_commit") == 1
    assert value("duplex_domain_events_dropped") == 1
    assert value("duplex_domain_events_queued") == 4


def test_the_saturation_sample_comes_from_the_view() -> None:
    assert sample_of(WorkerMetrics("w"), heartbeat_age_s=0.0, heartbeat_interval_s=5.0) is None
    sample = sample_of(attached_metrics(), heartbeat_age_s=1.5, heartbeat_interval_s=5.0)
    assert sample == Sample(
        slots=3,
        running=1,
        waiting_for_slot=1,
        awaiting_commit=1,
        commit_batch_size=10,
        commit_failing=False,
        events_dropped=1,
        heartbeat_age_s=1.5,
        heartbeat_interval_s=5.0,
    )


# --- health ----------------------------------------------------------------------------------


def test_health_is_gathered_from_the_view() -> None:
    relay_lag = {"unpublished": 2}
    metrics = attached_metrics(
        queue=QueueProbe(lambda: QueueFigures({}, {}, relay_lag), refresh_s=0)
    )

    def gathered(**changes: Any) -> HealthSnapshot:
        args: dict[str, Any] = {
            "phase": "running",
            "failure": None,
            "actors": {"Dispatcher": True},
            "database_error": None,
            "heartbeat_age_s": 0.5,
            "heartbeat_interval_s": 5.0,
            "relay": True,
        }
        return gather(metrics, **{**args, **changes})

    snapshot = gathered()
    assert readiness(snapshot) == []
    assert snapshot.slots == {
        "total": 3,
        "running": 1,
        "free": 1,
        "waiting": 1,
        "abandoned_threads": 1,
    }
    assert snapshot.commit == {"results_awaiting_commit": 1, "failing": False}
    assert details(snapshot)["relay"] == relay_lag
    assert gathered(relay=False).extra["relay"] is None
    # A stopped worker lists no actors.
    assert gathered(phase="stopped").actors == {}
    before_start = gather(
        WorkerMetrics("w1"),
        phase="starting",
        failure=None,
        actors={},
        database_error="unreachable",
        heartbeat_age_s=None,
        heartbeat_interval_s=5.0,
        relay=False,
    )
    assert (before_start.slots, before_start.commit) == (None, None)
    assert readiness(before_start) == ["worker is starting", "database unreachable: unreachable"]


def test_the_database_probe_says_why_it_failed(sqlite_db: Database, tmp_path: Any) -> None:
    from duplex.settings import DatabaseSettings

    assert database_error(sqlite_db) is None
    missing = Database(DatabaseSettings(url=f"sqlite:///{tmp_path}/nothing-here/x.db"))
    error = database_error(missing)
    assert error is not None
    assert not error.startswith("database error: ")


def snapshot(**changes: Any) -> HealthSnapshot:
    base: dict[str, Any] = {
        "worker_id": "w1",
        "version": "0.1.0",
        "phase": "running",
        "uptime_s": 1.0,
        "actors": {"Dispatcher": True, "CompletionProcessor": True},
        "failure": None,
        "database_error": None,
        "heartbeat_age_s": 1.0,
    }
    return HealthSnapshot(**{**base, **changes})


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"phase": "starting"}, "worker is starting"),
        ({"phase": "draining"}, "worker is draining"),
        ({"database_error": "connection refused"}, "database unreachable: connection refused"),
        ({"actors": {"Dispatcher": False}}, "actor(s) not alive: Dispatcher"),
        ({"failure": "actor Dispatcher failed: boom"}, "actor Dispatcher failed: boom"),
    ],
)
def test_readiness_names_each_reason(changes: dict[str, Any], reason: str) -> None:
    assert readiness(snapshot()) == []
    assert readiness(snapshot(**changes)) == [reason]
    assert details(snapshot(**changes))["status"] == "not_ready"


def test_health_details_flag_a_late_heartbeat() -> None:
    assert details(snapshot(heartbeat_age_s=11.0))["heartbeat"]["late"] is True
    assert details(snapshot(heartbeat_age_s=9.0))["heartbeat"]["late"] is False


# --- the HTTP app and server -----------------------------------------------------------------


def call(app: Any, path: str, method: str = "GET") -> tuple[str, bytes]:
    answer: dict[str, str] = {}

    def start_response(status: str, headers: Iterable[tuple[str, str]], exc: Any = None) -> Any:
        answer["status"] = status
        return lambda data: None

    body = b"".join(
        app({"PATH_INFO": path, "REQUEST_METHOD": method, "QUERY_STRING": ""}, start_response)
    )
    return answer["status"], body


def test_app_routes_and_answers_503_when_the_health_check_itself_fails() -> None:
    def broken() -> HealthSnapshot:
        raise RuntimeError("bug")

    registry = CollectorRegistry()
    app = make_app(broken, registry)
    assert call(app, "/health/live")[0] == "200 OK"
    status, body = call(app, "/health/ready")
    assert status.startswith("503")
    assert "health check failed: bug" in body.decode()
    assert call(app, "/nope")[0].startswith("404")
    assert call(app, "/health", method="POST")[0].startswith("405")
    assert call(make_app(snapshot, registry), "/health/ready")[0] == "200 OK"
    assert call(make_app(lambda: snapshot(phase="draining"), registry), "/health")[0].startswith(
        "503"
    )


def test_server_binds_a_free_port_serves_and_stops() -> None:
    server = HttpServer("127.0.0.1", 0, make_app(snapshot, CollectorRegistry()))
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=5) as r:
            assert json.loads(r.read())["status"] == "ready"
        other = HttpServer("127.0.0.1", server.port, make_app(snapshot, CollectorRegistry()))
        with pytest.raises(ConfigurationError, match=f"cannot listen on 127.0.0.1:{server.port}"):
            other.start()
    finally:
        server.stop()
    assert not [t for t in threading.enumerate() if t.name == "duplex-http"]


# --- saturation ------------------------------------------------------------------------------


def sample(**changes: Any) -> Sample:
    base: dict[str, Any] = {
        "slots": 4,
        "running": 4,
        "waiting_for_slot": 2,
        "awaiting_commit": 0,
        "commit_batch_size": 500,
        "commit_failing": False,
        "events_dropped": 0,
        "heartbeat_age_s": 1.0,
        "heartbeat_interval_s": 5.0,
    }
    return Sample(**{**base, **changes})


def test_saturation_warns_once_per_interval_with_figures() -> None:
    monitor = SaturationMonitor(10.0, start=0.0)
    for _ in range(100):
        monitor.observe(sample())
    assert monitor.report(9.9, lambda: None) == []
    (line,) = monitor.report(10.0, lambda: None)
    assert "all 4 handler slots busy for the last 10s" in line
    assert "2 claimed step(s) waiting" in line
    assert monitor.report(10.5, lambda: None) == []  # a new interval has begun


def test_saturation_needs_every_sample_busy_and_work_waiting() -> None:
    monitor = SaturationMonitor(1.0, start=0.0)
    monitor.observe(sample())
    monitor.observe(sample(running=3))
    assert monitor.report(1.0, lambda: 5) == []
    monitor.observe(sample(waiting_for_slot=0))
    assert monitor.report(2.0, lambda: 0) == []  # busy, but nothing waiting
    monitor.observe(sample(waiting_for_slot=0))
    (line,) = monitor.report(3.0, lambda: 7)
    assert "7 ready in SQL" in line


def test_saturation_reports_commit_lag_drops_and_heartbeat() -> None:
    monitor = SaturationMonitor(1.0, start=0.0)
    monitor.observe(sample(running=0, events_dropped=3))
    monitor.observe(sample(running=0, awaiting_commit=600, events_dropped=10, heartbeat_age_s=12.0))
    lines = monitor.report(1.0, lambda: None)
    assert len(lines) == 3
    assert "up to 600 result(s) awaiting commit" in lines[0]
    assert lines[1].startswith("7 domain event(s) dropped")
    assert "heartbeat lagging: up to 12.0s" in lines[2]
    monitor.observe(sample(running=0, events_dropped=10, commit_failing=True))
    (line,) = monitor.report(2.0, lambda: None)  # no new drops; commits failing
    assert "commits failing" in line


# --- logs ------------------------------------------------------------------------------------


def test_json_lines_carry_step_fields_as_top_level_keys() -> None:
    out = io.StringIO()
    sink = logger.add(out, format=_json_format, level="INFO")
    try:
        step_log(step("charge", attempt=2)).warning("it {} {{braces}}", "failed")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("plain line")
    finally:
        logger.remove(sink)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "it failed {braces}"
    assert {
        k: first[k] for k in ("task_uuid", "step_uuid", "step_name", "attempt", "worker_id")
    } == {
        "task_uuid": "task-1",
        "step_uuid": "uuid-charge",
        "step_name": "charge",
        "attempt": 2,
        "worker_id": "w1",
    }
    assert first["level"] == "WARNING"
    assert "ValueError: boom" in second["exception"]
    assert "step_uuid" not in second


# --- liveness --------------------------------------------------------------------------------


def test_liveness_rule() -> None:
    def rule(**changes: Any) -> str:
        args: dict[str, Any] = {
            "hostname": "here",
            "pid": 42,
            "heartbeat_at": T0,
            "stopped_at": None,
            "now": T0 + timedelta(seconds=5),
            "claim_timeout_s": 30.0,
            "this_host": "here",
            "process_alive": lambda pid: True,
        }
        return judge(**{**args, **changes}).state

    assert rule() == "alive"
    assert rule(stopped_at=T0) == "stopped"
    assert rule(now=T0 + timedelta(seconds=31)) == "presumed dead"
    assert rule(process_alive=lambda pid: False) == "presumed dead"
    # Another host's process cannot be looked at: only the heartbeat counts there.
    assert rule(hostname="there", process_alive=lambda pid: False) == "alive"


# --- the queue query, on both backends --------------------------------------------------------


def test_ready_queue_counts_ready_steps_and_the_oldest_age(db: Database) -> None:
    template = parse_template(
        'name = "q"\n[[steps]]\nname = "a"\nhandler = "h"\n'
        '[[steps]]\nname = "b"\nhandler = "h"\n'
        '[[steps]]\nname = "c"\nhandler = "h"\ndepends_on = ["a"]\n'
    )
    with db.write() as conn:
        create_task(conn, template, {}, now=T0 - timedelta(seconds=10))
        create_task(conn, template, {}, now=T0 - timedelta(seconds=4))
    with db.read() as conn:
        ready, oldest = ready_queue(conn, ["default", "other"], now=T0)
        later, _ = ready_queue(conn, ["default"], now=T0 - timedelta(seconds=7))
    assert ready == {"default": 4, "other": 0}  # the roots; c waits for a
    assert oldest["default"] == pytest.approx(10.0)
    assert oldest["other"] == 0.0
    assert later == {"default": 2}  # only what was ready by then


def test_the_relays_lag_is_on_health_and_metrics(sqlite_db: Database) -> None:
    """A worker whose relay cannot reach its broker: the committed events wait, and both
    ``/health`` and ``/metrics`` say how many and for how long."""
    import json
    import urllib.request

    from duplex import Client
    from duplex.handlers import HandlerRegistry
    from duplex.subscriptions import SubscriberRegistry
    from duplex.templates import parse_template
    from duplex.worker.wiring import Worker
    from tests.conftest import make_settings, open_work, wait_until

    registry = HandlerRegistry()
    registry.register("t.noop", lambda ctx: None)
    template = parse_template('name = "lag"\n[[steps]]\nname = "only"\nhandler = "t.noop"\n')
    Client(sqlite_db).submit_many(template, [{} for _ in range(3)])
    settings = make_settings(
        str(sqlite_db.url),
        event_system={"polling_interval_ms": 20},
        observability={"http_port": 0, "queue_refresh_s": 0},
        # Nothing listens on port 1: every event stays unpublished.
        relay={"enabled": True, "url": "amqp://guest:guest@127.0.0.1:1/%2F"},
    )
    worker = Worker(settings, sqlite_db, registry=registry, subscribers=SubscriberRegistry())
    worker.start()
    try:
        assert wait_until(lambda: open_work(sqlite_db) == 0, timeout_s=20)
        assert worker.http is not None
        base = f"http://127.0.0.1:{worker.http.port}"
        with urllib.request.urlopen(f"{base}/health", timeout=10) as answer:
            relay = json.loads(answer.read())["relay"]
        # step.completed of each of the three steps, none confirmed by a broker
        assert relay["unpublished"] == 3
        assert relay["dead_lettered"] == 0
        assert relay["oldest_unpublished_age_s"] >= 0
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:
            families = {f.name: f for f in text_string_to_metric_families(answer.read().decode())}
        (unpublished,) = families["duplex_relay_unpublished_events"].samples
        assert unpublished.value == 3
        assert "duplex_relay_oldest_unpublished_age_seconds" in families
    finally:
        worker.stop()
