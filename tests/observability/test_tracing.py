"""Traces through the real actors, recorded by the OpenTelemetry SDK's in-memory exporter.

A diamond workflow (with a retried step) gives one trace: one span per attempt, each with
its handler, attempt and outcome, and a span per commit batch that parents or links every
attempt it committed. The trace continues the context given at submit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pykka.messages import ProxyCall

from duplex import Client
from duplex.errors import RetryableError
from duplex.handlers import HandlerRegistry, StepContext
from duplex.storage.db import Database
from duplex.storage.results import CommitReport
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import parse_template
from duplex.worker.wiring import Worker
from tests.conftest import make_settings, open_work, sqlite_database, wait_until

DIAMOND = parse_template(
    """
name = "diamond"
[[steps]]
name = "a"
handler = "t.step"
[[steps]]
name = "b"
handler = "t.step"
depends_on = ["a"]
max_attempts = 2
[[steps]]
name = "c"
handler = "t.step"
depends_on = ["a"]
[[steps]]
name = "d"
handler = "t.step"
depends_on = ["b", "c"]
"""
)


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[tuple[Database, TracerProvider, InMemorySpanExporter]]:
    db = sqlite_database(tmp_path / "t.db")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield db, provider, exporter
    provider.shutdown()
    db.dispose()


def run_worker(
    db: Database,
    provider: TracerProvider,
    registry: HandlerRegistry,
    *,
    linger_ms: float = 0,
    observer: Callable[[Worker, CommitReport], None] | None = None,
) -> None:
    settings = make_settings(
        str(db.url),
        worker={"max_concurrent_handlers": 2, "commit_linger_ms": linger_ms},
        retry={"backoff_base_ms": 10, "jitter": 0.0},
        event_system={"polling_interval_ms": 20},
        observability={"tracing": True},
    )
    started: list[Worker] = []

    def observe(report: CommitReport) -> None:
        if observer is not None:
            observer(started[0], report)

    worker = Worker(
        settings,
        db,
        registry=registry,
        subscribers=SubscriberRegistry(),
        tracer_provider=provider,
        observer=observe,
    )
    started.append(worker)
    worker.start()
    try:
        assert wait_until(lambda: open_work(db) == 0, 30)
    finally:
        worker.stop()


def handlers(provider: TracerProvider) -> HandlerRegistry:
    registry = HandlerRegistry()
    inner = provider.get_tracer("handler")

    def step(ctx: StepContext) -> dict[str, Any]:
        with inner.start_as_current_span(f"inside {ctx.step_name}"):
            if ctx.step_name == "b" and ctx.attempt == 1:
                raise RetryableError("once more")
        return {}

    registry.register("t.step", step)
    return registry


def hold_commits_after_a(worker: Worker, report: CommitReport) -> None:
    """Once ``a`` is committed, hold the commit path (this runs on its thread) until the
    results of ``b``'s and ``c``'s first attempts both wait in its mailbox: they then commit
    in one batch. (``a``'s commit claimed one of them; the intake's poll takes the other.)"""
    if not any(o.step.name == "a" for o in report.applied):
        return
    assert worker.actors is not None
    inbox = worker.actors.completion.actor_ref.actor_inbox

    def both_results_wait() -> bool:
        waiting = {
            call.args[0].step.name
            for call in (envelope.message for envelope in list(inbox.queue))  # type: ignore[attr-defined]
            if isinstance(call, ProxyCall) and call.attr_path == ("submit",)
        }
        return waiting == {"b", "c"}

    assert wait_until(both_results_wait, 10)


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    named: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        named.setdefault(span.name, []).append(span)
    return named


def attr(span: ReadableSpan, key: str) -> Any:
    assert span.attributes is not None
    return span.attributes[key]


def attempt_of(span: ReadableSpan) -> tuple[Any, Any]:
    return attr(span, "duplex.step_name"), attr(span, "duplex.attempt")


def test_a_diamond_is_one_trace_with_a_span_per_attempt_and_commit(
    traced: tuple[Database, TracerProvider, InMemorySpanExporter],
) -> None:
    db, provider, exporter = traced
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("submit order") as root, Client(db) as client:
        client.submit(DIAMOND, {})
    run_worker(db, provider, handlers(provider), observer=hold_commits_after_a)

    spans = exporter.get_finished_spans()
    trace_id = root.get_span_context().trace_id
    assert {span.context.trace_id for span in spans} == {trace_id}  # one trace
    named = by_name(spans)
    attempts = [s for s in spans if s.name.startswith("attempt ")]
    names = sorted((attr(s, "duplex.step_name"), attr(s, "duplex.attempt")) for s in attempts)
    assert names == [
        ("a", 1),
        ("b", 1),
        ("b", 2),
        ("c", 1),
        ("d", 1),
    ]
    for span in attempts:
        assert span.parent is not None
        assert span.parent.span_id == root.get_span_context().span_id
        assert attr(span, "duplex.handler") == "t.step"
        first_b = (attr(span, "duplex.step_name"), attr(span, "duplex.attempt")) == (
            "b",
            1,
        )
        assert attr(span, "duplex.outcome") == ("retryable_error" if first_b else "success")
    # Spans a handler starts nest under its attempt.
    for span in attempts:
        children = [
            s
            for s in named[f"inside {attr(span, 'duplex.step_name')}"]
            if s.parent is not None and s.parent.span_id == span.context.span_id
        ]
        assert len(children) == 1
    # Every attempt's commit is a span: parented on it, or linking to it.
    committed: set[int] = set()
    for commit in named["commit"]:
        assert commit.parent is not None
        committed.add(commit.parent.span_id)
        committed.update(link.context.span_id for link in commit.links)
        assert attr(commit, "duplex.batch_size") >= 1
    assert committed == {span.context.span_id for span in attempts}
    assert any(commit.links for commit in named["commit"])  # a batch of two attempts


def test_the_trace_context_given_at_submit_is_continued(
    traced: tuple[Database, TracerProvider, InMemorySpanExporter],
) -> None:
    db, provider, exporter = traced
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    carrier = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    with Client(db) as client:
        client.submit(DIAMOND, {}, trace_context=carrier)
    run_worker(db, provider, handlers(provider))
    spans = exporter.get_finished_spans()
    assert {format(span.context.trace_id, "032x") for span in spans} == {trace_id}
    attempts = [s for s in spans if s.name.startswith("attempt ")]
    assert {s.parent.span_id for s in attempts if s.parent} == {0x00F067AA0BA902B7}


def test_a_task_submitted_without_a_context_is_still_one_trace(
    traced: tuple[Database, TracerProvider, InMemorySpanExporter],
) -> None:
    db, provider, exporter = traced
    with Client(db) as client:
        first = client.submit(DIAMOND, {})
        second = client.submit(DIAMOND, {})
    run_worker(db, provider, handlers(provider))
    traces: dict[str, set[int]] = {}
    for span in exporter.get_finished_spans():
        if span.name.startswith("attempt "):
            traces.setdefault(str(attr(span, "duplex.task_uuid")), set()).add(span.context.trace_id)
    # One trace per task, its id the task's UUID.
    assert traces == {
        first: {int(first.replace("-", ""), 16)},
        second: {int(second.replace("-", ""), 16)},
    }


def test_tracing_without_opentelemetry_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import duplex.observability.tracing
    from duplex.errors import ConfigurationError

    monkeypatch.setattr(duplex.observability.tracing, "_otel", lambda: None)
    db = sqlite_database(tmp_path / "t.db")
    try:
        settings = make_settings(str(db.url), observability={"tracing": True})
        with pytest.raises(ConfigurationError, match=r"pip install 'duplex\[tracing\]'"):
            Worker(settings, db)
    finally:
        db.dispose()
