"""docs/architecture.md, Guarantee 8: failures are contained. Real actors on SQLite, in-process.

An exception escaping any framework actor's message stops the embedded worker in order (the
watchdog runs the stop by itself) and ``stop()`` raises ``WorkerCrashedError`` naming the
actor; what the worker held is committed. A HandlerWorker that dies is replaced and its
attempt settled. User cancel hooks never run on the Dispatcher's thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pykka
import pytest
from sqlalchemy import select

from duplex.actors.completion_processor import CompletionProcessor
from duplex.actors.dispatcher import Dispatcher
from duplex.actors.event_publisher import DomainEventPublisher
from duplex.actors.event_system import EventSystem
from duplex.actors.handler_worker import HandlerWorker
from duplex.actors.step_executor import StepExecutor
from duplex.actors.supervised import SupervisedActor
from duplex.clock import Timer, utcnow
from duplex.dispatch.pool import HandlerPool
from duplex.errors import StorageError, WorkerCrashedError
from duplex.handlers import Cancellation, HandlerRegistry, StepContext
from duplex.messages import DomainEvent
from duplex.storage.db import Database
from duplex.storage.models import workflow_step_transitions, workflow_steps
from duplex.storage.submission import create_task
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import TaskTemplate
from duplex.worker.supervision import Supervisor
from duplex.worker.wiring import Worker
from tests.conftest import make_settings, open_work, wait_until


def submit(db: Database, count: int, handler: str = "t.quick", **extra: Any) -> str:
    steps = [{"name": f"s{i}", "handler": handler, **extra} for i in range(count)]
    template = TaskTemplate.model_validate({"name": "t", "steps": steps})
    with db.write() as conn:
        return create_task(conn, template, {}, now=utcnow())


def states(db: Database) -> list[tuple[str, int]]:
    with db.read() as conn:
        rows = conn.execute(select(workflow_steps.c.state, workflow_steps.c.attempts))
        return sorted((r.state, r.attempts) for r in rows)


def make_worker(
    db: Database,
    registry: HandlerRegistry,
    subscribers: SubscriberRegistry | None = None,
    **worker: Any,
) -> Worker:
    return Worker(
        make_settings(
            str(db.url),
            worker={"max_concurrent_handlers": 2, "shutdown_timeout_ms": 3000, **worker},
            event_system={"polling_interval_ms": 20},
            retry={"backoff_base_ms": 10, "jitter": 0.0},
        ),
        db,
        registry=registry,
        subscribers=subscribers or SubscriberRegistry(),
    )


@contextmanager
def injected(monkeypatch: pytest.MonkeyPatch, cls: type, method: str, nth: int) -> Iterator[None]:
    """Make the ``nth`` call of ``cls.method`` raise, as a bug in that actor would."""
    original = getattr(cls, method)
    calls = 0
    lock = threading.Lock()

    def faulty(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        with lock:
            calls += 1
            hit = calls == nth
        if hit:
            raise RuntimeError("injected fault")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, faulty)
    yield


def quick_registry(ran: list[str]) -> HandlerRegistry:
    registry = HandlerRegistry()

    def quick(ctx: StepContext) -> dict[str, str]:
        ran.append(ctx.step_name)
        ctx.emit("t.ran", {"step": ctx.step_name})
        time.sleep(0.01)
        return {"step": ctx.step_name}

    registry.register("t.quick", quick)
    return registry


@pytest.mark.parametrize(
    ("cls", "method"),
    [
        (EventSystem, "claimed"),
        (StepExecutor, "execute"),
        (Dispatcher, "slot_freed"),
        (CompletionProcessor, "flush"),
        (DomainEventPublisher, "publish"),
    ],
)
def test_a_failing_actor_stops_the_embedded_worker_in_order(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch, cls: type, method: str
) -> None:
    ran: list[str] = []
    worker = make_worker(sqlite_db, quick_registry(ran))
    with injected(monkeypatch, cls, method, nth=3):
        worker.start()
        submit(sqlite_db, 20)
        worker.nudge()
        # Nobody calls serve() or stop(): the watchdog notices and stops the worker itself.
        assert wait_until(lambda: worker.actors is None, timeout_s=20), "worker kept running"
    with pytest.raises(WorkerCrashedError, match=f"actor {cls.__name__} failed"):
        worker.stop()
    assert worker.failure is not None
    assert worker.failure.actor == cls.__name__
    # Nothing half-written: every claim ended in a result, a hand-back, or is left in progress
    # (held by a handler that had no way to report) for the liveness rule; no handler thread
    # of this worker survives the stop.
    with sqlite_db.read() as conn:
        settled = conn.execute(
            select(workflow_step_transitions.c.step_uuid, workflow_step_transitions.c.attempt)
            .where(workflow_step_transitions.c.from_state == "in_progress")
            .where(workflow_step_transitions.c.to_state != "enqueued")
        ).all()
    assert len(settled) == len(set(settled)), "an attempt has two outcomes"
    assert len(settled) <= len(ran)
    alive = [t.name for t in threading.enumerate() if t.name.startswith("duplex-")]
    assert alive == [] or alive == ["duplex-event-delivery"] * len(alive)

    # A fresh worker (the failed one's leftovers recovered at once) finishes the work.
    restarted = make_worker(sqlite_db, quick_registry(ran))
    restarted.start()
    try:
        assert wait_until(lambda: open_work(sqlite_db) == 0, timeout_s=30)
    finally:
        restarted.stop()
    assert {state for state, _ in states(sqlite_db)} == {"complete"}


def test_the_crash_names_the_exception_even_when_the_report_comes_late(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pykka marks a failed actor stopped just before its on_failure reports why; widen that
    # window so the watchdog always sees the dead actor first.
    reporting = SupervisedActor.on_failure

    def late_report(self: Any, *args: Any) -> None:
        time.sleep(0.3)
        reporting(self, *args)

    monkeypatch.setattr(SupervisedActor, "on_failure", late_report)
    worker = make_worker(sqlite_db, quick_registry([]))
    with injected(monkeypatch, Dispatcher, "slot_freed", nth=2):
        worker.start()
        submit(sqlite_db, 5)
        worker.nudge()
        assert wait_until(lambda: worker.actors is None, timeout_s=20), "worker kept running"
    with pytest.raises(WorkerCrashedError, match="actor Dispatcher failed: RuntimeError: injected"):
        worker.stop()


def test_a_dying_handler_worker_is_replaced_and_its_attempt_settled(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []
    worker = make_worker(sqlite_db, quick_registry(ran))
    with injected(monkeypatch, HandlerWorker, "run", nth=2):
        worker.start()
        submit(sqlite_db, 6, max_attempts=2)
        worker.nudge()
        try:
            assert wait_until(lambda: open_work(sqlite_db) == 0, timeout_s=20)
        finally:
            final = worker.stop()  # no failure: the policy for a HandlerWorker is a restart
    assert states(sqlite_db).count(("complete", 2)) == 1
    assert states(sqlite_db).count(("complete", 1)) == 5
    with sqlite_db.read() as conn:
        reasons = conn.execute(select(workflow_step_transitions.c.reason)).scalars().all()
    assert reasons.count("handler_worker_failed") == 1
    assert final["dispatcher"]["idle"] == 2


def test_a_failed_completion_processor_commits_what_it_held(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The salvage takes in results still in the mailbox and commits them before it goes."""
    ran: list[str] = []
    delivered: list[DomainEvent] = []
    subscribers = SubscriberRegistry()
    subscribers.add("*", delivered.append)
    worker = make_worker(sqlite_db, quick_registry(ran), subscribers, max_concurrent_handlers=4)
    original_flush = CompletionProcessor.flush
    failed = threading.Event()

    def held(actor: CompletionProcessor) -> int:
        with actor.actor_inbox.mutex:  # type: ignore[attr-defined]
            queued = [envelope.message for envelope in actor.actor_inbox.queue]  # type: ignore[attr-defined]
        in_mailbox = sum(getattr(m, "attr_path", None) == ("submit",) for m in queued)
        return len(actor._buffer.outcomes) + int(in_mailbox)

    def fail_once_all_results_are_held(self: CompletionProcessor, *args: Any) -> None:
        # The moment under test: the first commit fails with every result either taken in
        # or still waiting in the mailbox.
        if failed.is_set():
            return original_flush(self, *args)
        failed.set()
        assert wait_until(lambda: held(self) == 8, timeout_s=20)
        raise RuntimeError("injected fault")

    monkeypatch.setattr(CompletionProcessor, "flush", fail_once_all_results_are_held)
    worker.start()
    submit(sqlite_db, 8)
    worker.nudge()
    assert wait_until(lambda: worker.actors is None, timeout_s=20)
    with pytest.raises(WorkerCrashedError, match="CompletionProcessor"):
        worker.stop()
    with sqlite_db.read() as conn:
        completed = conn.execute(
            select(workflow_steps.c.step_uuid).where(workflow_steps.c.state == "complete")
        ).all()
    assert len(completed) == len(ran) > 0  # every result that was held got committed
    assert worker.supervisor.lost == 0
    assert {e.name for e in delivered} <= {"t.ran", "step.completed"}


def test_a_dead_dispatcher_does_not_strand_claims(sqlite_db: Database) -> None:
    """Claims the StepExecutor cannot hand on are handed back in SQL at once."""
    registry = HandlerRegistry()
    dispatcher = Dispatcher.start(
        None, registry, Timer(), pool=HandlerPool(1), default_timeout_s=1.0, max_result_bytes=1000
    )
    dead_proxy = dispatcher.proxy()
    dispatcher.stop()
    supervisor = Supervisor()
    executor = StepExecutor.start(
        sqlite_db, dead_proxy, worker_id="w1", namespaces=["default"], supervisor=supervisor
    )
    try:
        submit(sqlite_db, 3)
        executor.proxy().execute(3).get(timeout=10)
    finally:
        executor.stop()
    assert states(sqlite_db) == [("enqueued", 0)] * 3
    with sqlite_db.read() as conn:
        reasons = conn.execute(select(workflow_step_transitions.c.reason)).scalars().all()
    assert reasons.count("the dispatcher is gone") == 3
    assert supervisor.lost == 0


class LostCommitReply(Database):
    """A database whose next write commits, then reports a lost connection."""

    def __init__(self, inner: Database) -> None:
        self.__dict__.update(inner.__dict__)
        self.lose_next = False

    @contextmanager
    def write(self) -> Iterator[Any]:
        with super().write() as conn:
            yield conn
        if self.lose_next:
            self.lose_next = False
            raise StorageError("database error: server closed the connection unexpectedly")


def test_a_claim_whose_commit_reply_was_lost_is_handed_back(sqlite_db: Database) -> None:
    """The claim committed but the StepExecutor heard a failure: its steps are not stranded."""
    db = LostCommitReply(sqlite_db)
    dispatched: list[Any] = []
    dispatcher = Collector.start(dispatched)
    executor = StepExecutor.start(db, dispatcher.proxy(), worker_id="w1", namespaces=["default"])
    try:
        submit(sqlite_db, 3)
        db.lose_next = True
        executor.proxy().execute(3).get(timeout=10)
        assert states(sqlite_db) == [("in_progress", 1)] * 3  # claimed, unheard of
        executor.proxy().execute(3).get(timeout=10)  # the retry settles the lost claim first
    finally:
        executor.stop()
        dispatcher.stop()
    assert [s.attempt for batch in dispatched for s in batch] == [1, 1, 1]
    with sqlite_db.read() as conn:
        reasons = conn.execute(select(workflow_step_transitions.c.reason)).scalars().all()
    assert reasons.count("claim not confirmed (connection lost)") == 3


class Collector(pykka.ThreadingActor):
    """Stands in for the Dispatcher: records what it is told to dispatch."""

    def __init__(self, into: list[Any]) -> None:
        super().__init__()
        self.into = into

    def dispatch(self, steps: list[Any]) -> None:
        self.into.append(steps)


def test_cancel_hooks_never_run_on_the_dispatcher_thread(sqlite_db: Database) -> None:
    registry = HandlerRegistry()
    hook_threads: list[str] = []
    blocking_hook_entered, release_hook = threading.Event(), threading.Event()
    later_step_ran = threading.Event()

    def stuck(ctx: StepContext) -> None:
        def raising_hook() -> None:
            hook_threads.append(threading.current_thread().name)
            raise ValueError("hook failed")

        def blocking_hook() -> None:
            blocking_hook_entered.set()
            release_hook.wait(20)

        ctx.cancelled.on_cancel(blocking_hook if ctx.inputs.get("block") else raising_hook)
        ctx.cancelled.wait(10)

    def quick(ctx: StepContext) -> None:
        later_step_ran.set()

    registry.register("t.stuck", stuck)
    registry.register("t.quick", quick)
    worker = make_worker(sqlite_db, registry, max_concurrent_handlers=1)
    worker.start()
    try:
        template = TaskTemplate.model_validate(
            {
                "name": "hooks",
                "steps": [
                    {"name": "raises", "handler": "t.stuck", "timeout_ms": 200, "max_attempts": 1},
                    {
                        "name": "blocks",
                        "handler": "t.stuck",
                        "timeout_ms": 200,
                        "max_attempts": 1,
                        "inputs": {"block": True},
                    },
                    {"name": "after", "handler": "t.quick", "depends_on": ["raises", "blocks"]},
                ],
            }
        )
        worker.submit(template)
        # Both hooks ran on a thread of their own, one raising and one still blocked.
        assert wait_until(lambda: blocking_hook_entered.is_set() and len(hook_threads) == 1)
        assert hook_threads == ["duplex-cancel-hook"]
        assert wait_until(lambda: states(sqlite_db).count(("error", 1)) == 2)
        # "after" never runs (its parents failed); new work still runs in the only slot.
        submit(sqlite_db, 1)
        worker.nudge()
        assert later_step_ran.wait(10), "a blocking cancel hook stalled dispatching"
    finally:
        release_hook.set()
        final = worker.stop()
    assert final["dispatcher"]["timeouts"] == 2


def test_cancel_hook_runs_after_the_timeout_result_was_sent() -> None:
    order: list[str] = []
    cancellation = Cancellation()
    cancellation.on_cancel(lambda: order.append("hook"))
    order.append("result sent")
    cancellation.cancel()
    assert wait_until(lambda: order == ["result sent", "hook"], timeout_s=5)
    assert cancellation.is_set()


def test_an_async_handlers_own_cancel_hook_is_kept(sqlite_db: Database) -> None:
    registry = HandlerRegistry()
    hook_ran, handler_cancelled = threading.Event(), threading.Event()

    async def slow(ctx: StepContext) -> None:
        ctx.cancelled.on_cancel(hook_ran.set)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            handler_cancelled.set()
            raise

    registry.register("t.slow", slow)
    worker = make_worker(sqlite_db, registry)
    worker.start()
    try:
        submit(sqlite_db, 1, handler="t.slow", timeout_ms=200, max_attempts=1)
        worker.nudge()
        assert handler_cancelled.wait(10), "the async handler was not cancelled"
        assert hook_ran.wait(10), "the handler's own hook was overwritten"
    finally:
        worker.stop()


def test_supervisor_reports_the_first_failure() -> None:
    supervisor = Supervisor()
    assert supervisor.first_failure() is None
    supervisor.actor_failed("Dispatcher", RuntimeError("boom"))
    supervisor.actor_failed("StepExecutor", None)
    assert str(supervisor.first_failure()) == "actor Dispatcher failed: RuntimeError: boom"
    assert [f.error for f in supervisor.failures()] == ["RuntimeError: boom", "its thread died"]
    assert supervisor.failed.is_set()
    supervisor.results_lost(2)
    assert supervisor.lost == 2
