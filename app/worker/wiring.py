"""The long-lived worker: start the actors in one linear function, stop them in reverse.

Flow (DESIGN.md section 1):
EventSystem -> CommandProcessor -> StepExecutor -> Dispatcher (dispatch channel) ->
HandlerWorker -> CompletionProcessor (completion channel) -> DomainEventPublisher ->
RelayActor (when ``[relay] enabled``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka
from loguru import logger
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from duplex.actors.command_processor import CommandProcessor, CommandProcessorProxy
from duplex.actors.completion_processor import (
    CommitObserver,
    CompletionProcessor,
    CompletionProcessorProxy,
)
from duplex.actors.dispatcher import Dispatcher, DispatcherProxy
from duplex.actors.event_publisher import DomainEventPublisher, DomainEventPublisherProxy
from duplex.actors.event_system import EventSystem, EventSystemProxy
from duplex.actors.relay import RelayActor, RelayActorProxy
from duplex.actors.step_executor import StepExecutor, StepExecutorProxy
from duplex.actors.supervised import tell
from duplex.clock import Timer, utcnow
from duplex.commit.retry import RetryPolicy
from duplex.errors import DuplexError, StorageError
from duplex.events.broker import AmqpPublisher
from duplex.events.relay import Relay
from duplex.handlers import HandlerRegistry
from duplex.handlers import registry as default_registry
from duplex.messages import JSONDict, Shutdown, Status
from duplex.observability.http import HttpServer, make_app
from duplex.observability.metrics import DuplexCollector, QueueFigures, QueueProbe, WorkerMetrics
from duplex.observability.saturation import Sample, SaturationMonitor
from duplex.observability.tracing import StepTracer, current_carrier
from duplex.settings import Settings
from duplex.storage.claims import count_open_work
from duplex.storage.db import Database
from duplex.storage.listen import EventListener, SequenceRange, WorkListener
from duplex.storage.outbox import event_lag
from duplex.storage.queries import ready_queue, task_trace_context
from duplex.storage.submission import create_task
from duplex.storage.workers import mark_worker_stopped, record_heartbeat, register_worker
from duplex.subscriptions import SubscriberRegistry
from duplex.subscriptions import subscribers as default_subscribers
from duplex.templates import TaskTemplate
from duplex.worker.health import HealthSnapshot, Phase
from duplex.worker.supervision import ActorFailure, Supervisor

_ASK_TIMEOUT_S = 10.0
# How often the watchdog looks at the actors, and the longest wait for an answer from one.
_WATCH_TICK_S = 0.05
_FAILURE_REPORT_GRACE_S = 1.0
_STATS_TIMEOUT_S = 1.0


class WorkerCrashedError(DuplexError):
    """One of the worker's actors failed; the worker stopped in order rather than run crippled."""


class UncommittedResultsError(DuplexError):
    """The worker stopped with results it could not commit (the database was unreachable)."""


def new_worker_id() -> str:
    """Return an id unique across hosts and restarts: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Actors:
    """Proxies of the running actors, in flow order."""

    event_system: EventSystemProxy
    command_processor: CommandProcessorProxy
    step_executor: StepExecutorProxy
    dispatcher: DispatcherProxy
    completion: CompletionProcessorProxy
    publisher: DomainEventPublisherProxy
    relay: RelayActorProxy | None = None


class Worker:
    """One Duplex worker process: its actors, its heartbeat, its watchdog and its stop.

    ``start()`` returns at once; the actors, a heartbeat thread and a watchdog thread then
    run on their own. ``serve()`` blocks until a stop is requested. ``stop()`` drains in order
    and raises ``WorkerCrashedError`` if an actor failed, ``UncommittedResultsError`` if
    results could not be committed. When an actor fails, the watchdog runs that same stop by
    itself, so an embedding application never keeps a half-alive worker.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        registry: HandlerRegistry = default_registry,
        subscribers: SubscriberRegistry = default_subscribers,
        observer: CommitObserver | None = None,
        tracer_provider: Any = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.worker_id = settings.worker.id or new_worker_id()
        self.registry = registry
        self.subscribers = subscribers
        self.observer = observer
        self.supervisor = Supervisor()
        self.stop_requested = threading.Event()
        self.failure: ActorFailure | None = None
        self.timer: Timer | None = None
        self.actors: Actors | None = None
        self._refs: list[pykka.ActorRef[Any]] = []
        # Set from a signal handler: a plain assignment, no lock, no logging.
        self._stop_flag = False
        self._stopping = False
        self._stop_lock = threading.Lock()
        self._final: dict[str, Any] | None = None
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stats: dict[str, Any] = {}
        self._last_beat = time.monotonic()
        self.metrics = WorkerMetrics(self.worker_id)
        self.metrics.queue = QueueProbe(self._read_queue, settings.observability.queue_refresh_s)
        self.metrics.draining = lambda: self.phase == "draining"
        # The worker's own registry: two workers embedded in one process never collide.
        self.registry_metrics = CollectorRegistry()
        self.registry_metrics.register(DuplexCollector(self.metrics))
        ProcessCollector(registry=self.registry_metrics)
        PlatformCollector(registry=self.registry_metrics)
        GCCollector(registry=self.registry_metrics)
        self._registered = False
        # Set when a start failed half-way: the row says stopped, so this worker never serves.
        self._start_failed = False
        # Set before the first registration's write: whether the row may exist, so that a
        # stop (or a signal) that lands between its COMMIT and ``_registered`` still marks it.
        self._row_may_exist = False
        self.http: HttpServer | None = None
        self.tracer: StepTracer | None = None
        if settings.observability.tracing:
            self.tracer = StepTracer(self._trace_context, tracer_provider=tracer_provider)
        self._saturation = SaturationMonitor(
            settings.observability.saturation_interval_s, start=time.monotonic()
        )

    def start(self) -> Actors:
        """Register the worker (unless ``register`` did) and start the actors, downstream
        first, wiring proxies.

        A start that fails half-way stops the actors and threads it started and records the
        worker as stopped before it raises (only the health port stays open until ``stop``).
        Such a worker is done: its row says stopped, so other workers would recover anything
        it claimed; a second ``start`` is refused, and a new ``Worker`` is what starts again.
        A stop requested while it starts (``request_stop``) keeps the intake from ever
        beginning.
        """
        if self._start_failed:
            raise RuntimeError("this Worker's start failed; create a new Worker to start again")
        self.serve_http()
        if not self._registered:
            self.register()
        started: list[pykka.ActorRef[Any]] = []
        try:
            return self._start_actors(started)
        except BaseException:
            self._abandon_start(started)
            raise

    def _start_actors(self, started: list[pykka.ActorRef[Any]]) -> Actors:
        cfg = self.settings.worker
        self.timer = Timer()
        supervisor = self.supervisor
        relay = self._start_relay(self.timer)
        if relay is not None:
            started.append(relay)
        relay_proxy = RelayActorProxy.of(relay) if relay is not None else None
        publisher = DomainEventPublisher.start(
            self.subscribers,
            buffer_size=self.settings.domain_events.buffer_size,
            supervisor=supervisor,
            metrics=self.metrics,
            relay=relay_proxy,
        )
        started.append(publisher)
        completion = CompletionProcessor.start(
            self.db,
            publisher.proxy(),
            self.timer,
            policy=RetryPolicy.from_settings(self.settings.retry),
            batch_size=cfg.commit_batch_size,
            linger_s=cfg.commit_linger_ms / 1000,
            claim_timeout_s=self.settings.event_system.claim_timeout_s,
            worker_id=self.worker_id,
            observer=self.observer,
            supervisor=supervisor,
            metrics=self.metrics,
            tracer=self.tracer,
        )
        started.append(completion)
        dispatcher = Dispatcher.start(
            completion.proxy(),
            self.registry,
            self.timer,
            size=cfg.max_concurrent_handlers,
            default_timeout_s=cfg.handler_timeout_ms / 1000,
            max_result_bytes=cfg.max_result_bytes,
            prefetch=cfg.prefetch,
            supervisor=supervisor,
            metrics=self.metrics,
            tracer=self.tracer,
        )
        started.append(dispatcher)
        executor = StepExecutor.start(
            self.db,
            dispatcher.proxy(),
            worker_id=self.worker_id,
            namespaces=cfg.namespaces,
            supervisor=supervisor,
            metrics=self.metrics,
        )
        started.append(executor)
        commands = CommandProcessor.start(executor.proxy(), dispatcher.proxy(), supervisor)
        started.append(commands)
        polling, listen = self._intake_signals()
        intake = EventSystem.start(
            commands.proxy(),
            self.timer,
            slots=cfg.max_concurrent_handlers,
            max_prefetch=cfg.prefetch,
            polling_interval_s=self.settings.event_system.polling_interval_ms / 1000,
            polling=polling,
            listen=listen,
            supervisor=supervisor,
        )
        started.append(intake)
        self._refs = [intake, commands, executor, dispatcher, completion, publisher]
        if relay is not None:
            self._refs.append(relay)
        self.actors = Actors(
            EventSystemProxy.of(intake),
            CommandProcessorProxy.of(commands),
            StepExecutorProxy.of(executor),
            DispatcherProxy.of(dispatcher),
            CompletionProcessorProxy.of(completion),
            DomainEventPublisherProxy.of(publisher),
            relay_proxy,
        )
        # Back-edges of the flow: credits and nudges return to the intake.
        pykka.get_all(
            [
                self.actors.step_executor.connect(self.actors.event_system),
                self.actors.dispatcher.connect(self.actors.event_system),
                self.actors.completion.connect(self.actors.event_system),
            ]
        )
        # A restart after a crash on this host resumes the dead worker's steps at once.
        try:
            self.actors.completion.recover_lost_claims().get(timeout=_ASK_TIMEOUT_S)
        except pykka.Timeout:
            # The database is slow to answer: the watchdog's next round tries again.
            logger.warning("the first recovery of lost workers' claims did not finish in time")
        if not self._stop_flag:  # a stop asked for during start-up: never begin the intake
            self.actors.event_system.begin.defer()
        if relay_proxy is not None:
            tell(relay_proxy.wake)  # publish what earlier runs left unpublished
        self._threads = [
            threading.Thread(target=self._beat, name="duplex-heartbeat", daemon=True),
            threading.Thread(target=self._watch, name="duplex-watchdog", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        logger.info(
            "worker {} started: {} handler slots, namespaces {}, handlers {}",
            self.worker_id,
            cfg.max_concurrent_handlers,
            list(cfg.namespaces),
            self.registry.names(),
        )
        return self.actors

    def _abandon_start(self, started: list[pykka.ActorRef[Any]]) -> None:
        """Undo a start that failed half-way: stop what started, upstream first."""
        for ref in reversed(started):
            try:
                ref.stop(block=True, timeout=_ASK_TIMEOUT_S)
            except pykka.Timeout:
                logger.error("{} did not stop in time", ref.actor_class.__name__)
        if self.timer is not None:
            self.timer.stop()
        self._closing.set()
        for thread in self._threads:
            thread.join(timeout=_ASK_TIMEOUT_S)
        self.actors = None
        self._refs = []
        self._start_failed = True
        self._mark_stopped({})

    def register(self) -> None:
        """Record this worker in the ``workers`` table; safe to retry.

        ``duplex run`` calls it with retries before ``start``; ``start`` calls it otherwise.
        """
        self._row_may_exist = True
        with self.db.write() as conn:
            register_worker(
                conn, self.worker_id, hostname=socket.gethostname(), pid=os.getpid(), now=utcnow()
            )
        self._registered = True

    def serve_http(self) -> None:
        """Open the health and metrics port (``observability.http_port``), if configured.

        ``duplex run`` calls it before migrating, so that a probe sees the worker starting;
        ``start`` calls it otherwise. A port that cannot be bound is a ``ConfigurationError``.
        """
        cfg = self.settings.observability
        if cfg.http_port is None or self.http is not None:
            return
        server = HttpServer(
            cfg.http_host, cfg.http_port, make_app(self.health_snapshot, self.registry_metrics)
        )
        server.start()
        self.http = server

    def close_http(self) -> None:
        if self.http is not None:
            self.http.stop()
            self.http = None

    @property
    def phase(self) -> Phase:
        if self._final is not None:
            return "stopped"
        if self._stop_flag or self._stopping or self.stop_requested.is_set():
            return "draining"
        if self.actors is None:
            return "starting"
        return "running"

    def health_snapshot(self) -> HealthSnapshot:
        """Gather what readiness is decided on; no actor is asked anything (called from the
        HTTP threads, it must answer even when an actor is stuck)."""
        phase = self.phase
        failure = self.failure or self.supervisor.first_failure()
        actors = {ref.actor_class.__name__: ref.is_alive() for ref in self._refs}
        if phase == "stopped":
            actors = {}
        metrics = self.metrics
        pool, buffer = metrics.pool, metrics.buffer
        slots = None
        if pool is not None:
            slots = {
                "total": pool.size,
                "running": len(pool.running),
                "free": len(pool.idle),
                "waiting": len(pool.waiting),
                "abandoned_threads": len(pool.abandoned),
            }
        commit = None
        if buffer is not None:
            commit = {"results_awaiting_commit": buffer.held, "failing": buffer.failing}
        return HealthSnapshot(
            worker_id=self.worker_id,
            version=metrics.version,
            phase=phase,
            uptime_s=metrics.uptime_s(),
            actors=actors,
            failure=None if failure is None else str(failure),
            database_error=self._probe_database(),
            slots=slots,
            commit=commit,
            heartbeat_age_s=None if self.actors is None else time.monotonic() - self._last_beat,
            heartbeat_interval_s=self.settings.worker.heartbeat_interval_s,
            extra={"relay": self._relay_lag()},
        )

    def _relay_lag(self) -> dict[str, Any] | None:
        """The relay's lag from the scrape figures' cache (one query per refresh interval)."""
        if not self.settings.relay.enabled or self.metrics.queue is None:
            return None
        figures = self.metrics.queue.figures()
        return None if figures is None else figures.relay

    def _probe_database(self) -> str | None:
        """Return why the database cannot be read, or None when it answers."""
        try:
            with self.db.read() as conn:
                # A real table, so SQLite reads the file rather than answering from nothing.
                conn.exec_driver_sql("SELECT count(*) FROM workers WHERE 1 = 0").scalar()
        except StorageError as exc:
            return str(exc).removeprefix("database error: ")
        return None

    def _trace_context(self, task_uuid: str) -> dict[str, str] | None:
        with self.db.read() as conn:
            return task_trace_context(conn, task_uuid)

    def _read_queue(self) -> QueueFigures:
        now = utcnow()
        with self.db.read() as conn:
            ready, oldest = ready_queue(conn, self.settings.worker.namespaces, now=now)
            relay = event_lag(conn, now=now).as_json(now) if self.settings.relay.enabled else None
        return QueueFigures(ready, oldest, relay)

    def _start_relay(self, timer: Timer) -> pykka.ActorRef[RelayActor] | None:
        """Start the outbox relay after the publisher, when ``[relay] enabled``."""
        cfg = self.settings.relay
        if not cfg.enabled:
            return None

        def connect() -> AmqpPublisher:
            return AmqpPublisher(cfg.url, cfg.exchange, connect_timeout_s=cfg.connect_timeout_s)

        listen = None
        if self.db.dialect == "postgresql":
            url = self.db.url

            def listen(on_events: Callable[[list[SequenceRange]], None]) -> EventListener:
                return EventListener(url, on_events)

        relay = Relay(self.db, cfg, connect=connect)
        return RelayActor.start(relay, timer, listen=listen, supervisor=self.supervisor)

    def _intake_signals(
        self,
    ) -> tuple[bool, Callable[[Callable[[], None]], WorkListener] | None]:
        """Return whether to poll, and how to build the LISTEN/NOTIFY listener (if any)."""
        mode = self.settings.event_system.deployment_mode
        if mode == "polling":
            return True, None
        if self.db.dialect != "postgresql":
            logger.warning(
                "event_system.deployment_mode = {!r} needs PostgreSQL LISTEN/NOTIFY; "
                "{} polls instead",
                mode,
                self.db.dialect,
            )
            return True, None
        namespaces = self.settings.worker.namespaces

        def listen(on_work: Callable[[], None]) -> WorkListener:
            return WorkListener(self.db.url, namespaces, on_work)

        return mode == "hybrid", listen

    def submit(self, template: TaskTemplate, context: JSONDict | None = None) -> str:
        """Create a task in this worker's database and wake the intake at once (its steps
        continue the caller's current trace, if any)."""
        with self.db.write() as conn:
            task_uuid = create_task(
                conn, template, context or {}, now=utcnow(), trace_context=current_carrier()
            )
        self.nudge()
        return task_uuid

    def nudge(self) -> None:
        """Tell the intake that work was just submitted in this process."""
        if self.actors is not None:
            self.actors.event_system.nudge.defer()

    def status(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Collect every actor's counters (called from outside the actors)."""
        assert self.actors is not None
        dispatcher_future = self.actors.command_processor.handle(Status()).get(timeout=timeout_s)
        return {
            "worker_id": self.worker_id,
            # For ``duplex workers`` on any machine: what it runs, and its slots in total.
            "version": self.metrics.version,
            "slots": self.settings.worker.max_concurrent_handlers,
            "dispatcher": dispatcher_future.get(timeout=timeout_s),
            "completion": self.actors.completion.stats().get(timeout=timeout_s),
            "events": self.actors.publisher.stats().get(timeout=timeout_s),
            "intake": self.actors.event_system.stats().get(timeout=timeout_s),
            **(
                {"relay": self.actors.relay.stats().get(timeout=timeout_s)}
                if self.actors.relay is not None
                else {}
            ),
        }

    def request_stop(self) -> None:
        """Ask ``serve()`` to return; safe in a signal handler (it only sets a flag)."""
        self._stop_flag = True

    def serve(self, *, until_idle: bool = False, on_tick: Callable[[], None] | None = None) -> None:
        """Run until a stop is requested (or, with ``until_idle``, until no work is left).

        Raises ``WorkerCrashedError`` (after the stop) when an actor failed.
        """
        tick_s = min(0.1, self.settings.event_system.polling_interval_ms / 1000)
        while not self._stop_flag and not self.stop_requested.wait(tick_s):
            if on_tick is not None:
                on_tick()
            if until_idle and self._idle():
                logger.info("no work left that could run; stopping (--until-idle)")
                return
        if self.failure is not None:
            self.stop()  # waits for the watchdog's stop and raises

    def stop(self) -> dict[str, Any]:
        """Stop in order, whatever has died; return the final stats.

        1. stop intake; 2. hand back claimed steps that never started; 3. let running
        handlers finish (up to ``worker.shutdown_timeout_ms``); 4. commit every result held;
        5. deliver the committed events. Each stage goes on past an actor that died. Then
        raise ``WorkerCrashedError`` if an actor failed, or ``UncommittedResultsError`` if
        results are left uncommitted (their steps fall to the liveness rule).
        """
        with self._stop_lock:
            if self._final is None:
                try:
                    final = self._stop()
                finally:
                    # Last: a probe sees the worker draining until its very end.
                    self.close_http()
                self._final = final
        failure = self.failure or self.supervisor.first_failure()
        if failure is not None:
            raise WorkerCrashedError(f"{failure}; the worker stopped")
        uncommitted = self._final.get("uncommitted", 0)
        if uncommitted:
            raise UncommittedResultsError(
                f"{uncommitted} result(s) could not be committed before the worker stopped; "
                "their steps will be recovered as worker_lost by the liveness rule"
            )
        return self._final

    def _stop(self) -> dict[str, Any]:
        actors = self.actors
        if actors is None:
            # Never started (stopped during start-up), or its failed start cleaned up.
            self._mark_stopped({})
            return {}
        self._stopping = True
        dead = [ref.actor_class.__name__ for ref in self._refs if not ref.is_alive()]
        if dead and self.failure is None:
            # Died before the watchdog looked: the stop still reports it.
            self.failure = self._failure_of(dead)
            logger.error("{}; stopping the worker in order", self.failure)
        deadline = time.monotonic() + self.settings.worker.shutdown_timeout_ms / 1000
        final: dict[str, Any] = {"uncommitted": 0}
        try:
            self._stage(
                "stop intake",
                lambda: actors.event_system.stop_intake().get(timeout=_ASK_TIMEOUT_S),
            )
            self._stage("hand back unstarted claims", lambda: self._hand_back_unstarted(actors))
            self._stage("finish running handlers", lambda: self._finish_handlers(actors, deadline))
            uncommitted = self._commit_everything(actors, deadline)
            final.update(self._final_stats(actors))
            self._stage(
                "deliver committed events",
                lambda: actors.publisher.close(timeout_s=5.0).get(timeout=10.0),
            )
            if actors.relay is not None:
                relay = actors.relay
                # Best effort: what is left stays in the table for the next relay.
                budget = min(5.0, max(0.5, deadline - time.monotonic()))
                self._stage(
                    "publish committed events to the broker",
                    lambda: relay.drain(budget).get(timeout=budget + _ASK_TIMEOUT_S),
                )
        except Exception:
            # A bug in a stage must not leave the actors' threads keeping the process alive.
            logger.exception("stop: unexpected error; stopping what is left")
            uncommitted = -1
        finally:
            self._release_everything()
        lost = self.supervisor.lost
        final["uncommitted"] = max(uncommitted, 0) + lost
        if uncommitted < 0 or final["uncommitted"]:
            logger.error(
                "{} result(s) could not be committed before exit; their steps will be "
                "recovered as worker_lost by the liveness rule (event_system.claim_timeout_s, "
                "or at once by the next worker started on this host)",
                final["uncommitted"] if uncommitted >= 0 else "some",
            )
        self._mark_stopped(final)
        self.actors = None
        logger.info("worker {} stopped", self.worker_id)
        return final

    def _release_everything(self) -> None:
        """Stop every actor and thread of this worker, whatever state they are in."""
        for ref in self._refs:
            try:
                ref.stop(block=True, timeout=_ASK_TIMEOUT_S)
            except pykka.Timeout:
                logger.error("{} did not stop in time", ref.actor_class.__name__)
        if self.timer is not None:
            self.timer.stop()
        self._closing.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=_ASK_TIMEOUT_S)

    def _final_stats(self, actors: Actors) -> dict[str, Any]:
        """The counters of every actor still alive (a dead one's part is left out)."""
        parts: dict[str, Any] = {
            "worker_id": self.worker_id,
            "version": self.metrics.version,
            "slots": self.settings.worker.max_concurrent_handlers,
        }
        for key, ask in (
            ("dispatcher", actors.dispatcher.stats),
            ("completion", actors.completion.stats),
            ("events", actors.publisher.stats),
            *((("relay", actors.relay.stats),) if actors.relay is not None else ()),
        ):
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                parts[key] = ask().get(timeout=_ASK_TIMEOUT_S)
        return parts

    def _stage(self, what: str, action: Callable[[], object]) -> None:
        """Run one stage of the stop; an actor that died or hangs is logged, then passed."""
        try:
            action()
        except (pykka.ActorDeadError, pykka.Timeout, StorageError) as exc:
            logger.error("stop: could not {}: {}", what, str(exc) or type(exc).__name__)

    def _hand_back_unstarted(self, actors: Actors) -> None:
        # Barriers: a claim command already on its way must reach the Dispatcher before the
        # drain, so that what it claimed is handed back rather than stranded.
        self._stage(
            "wait for claim commands in flight",
            lambda: actors.command_processor.handle(Status()).get(timeout=_ASK_TIMEOUT_S),
        )
        self._stage(
            "wait for claims in flight",
            lambda: actors.step_executor.claimed_total.get(timeout=_ASK_TIMEOUT_S),
        )
        try:
            actors.command_processor.handle(Shutdown()).get(timeout=_ASK_TIMEOUT_S)
        except pykka.ActorDeadError:
            actors.dispatcher.drain().get(timeout=_ASK_TIMEOUT_S)

    def _finish_handlers(self, actors: Actors, deadline: float) -> None:
        """Wait for running handlers until ``deadline``; then settle what still runs."""
        if not actors.dispatcher.actor_ref.is_alive():
            # The Dispatcher died: wait for the handler workers it left running (a stop
            # message queues behind the attempt in progress).
            for ref in self.supervisor.orphans():
                try:
                    ref.stop(block=True, timeout=max(0.01, deadline - time.monotonic()))
                except pykka.Timeout:
                    self.supervisor.results_lost(1)
            return
        dispatcher = actors.dispatcher
        while (
            dispatcher.stats().get(timeout=_ASK_TIMEOUT_S)["running"]
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        abandoned = dispatcher.abandon_running().get(timeout=_ASK_TIMEOUT_S)
        if abandoned:
            logger.warning("{} handler(s) still running at shutdown timeout", abandoned)
        # Once a worker has stopped, the result it sent is in the CompletionProcessor's
        # mailbox, ahead of anything asked of it from here on.
        for ref in dispatcher.live_workers().get(timeout=_ASK_TIMEOUT_S):
            ref.stop(block=True, timeout=_ASK_TIMEOUT_S)

    def _commit_everything(self, actors: Actors, deadline: float) -> int:
        """Commit every result the CompletionProcessor holds; return how many are left."""
        # At least one try, even when the handlers used up the shutdown timeout.
        budget = max(0.5, deadline - time.monotonic())
        try:
            left: int = actors.completion.drain(budget).get(timeout=budget + _ASK_TIMEOUT_S)
        except pykka.ActorDeadError:
            return 0  # what it held is counted by its salvage (Supervisor.lost)
        except pykka.Timeout:
            logger.error("stop: the CompletionProcessor did not finish committing in time")
            return int(self._stats.get("completion", {}).get("buffered", 0)) or 1
        return left

    def _watch(self) -> None:
        """The watchdog: notice a failed actor, recover lost workers, refresh stats."""
        cfg = self.settings
        recovery_every = min(1.0, cfg.event_system.claim_timeout_s / 3)
        next_recovery = time.monotonic() + recovery_every
        next_stats = time.monotonic()
        while not self._closing.is_set() and not self._stopping:
            self.supervisor.failed.wait(_WATCH_TICK_S)
            if self._stopping:
                return
            dead = [ref.actor_class.__name__ for ref in self._refs if not ref.is_alive()]
            if self.supervisor.failed.is_set() or dead:
                self._crash(dead)
                return
            actors = self.actors
            if actors is None:  # stopped meanwhile
                return
            self._watch_saturation()
            now = time.monotonic()
            if now >= next_recovery:
                tell(actors.completion.recover_lost_claims)
                next_recovery = now + recovery_every
            if now >= next_stats:
                # On no answer, the heartbeat goes on with the last stats.
                with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                    self._stats = self.status(timeout_s=_STATS_TIMEOUT_S)
                next_stats = now + cfg.worker.heartbeat_interval_s

    def _watch_saturation(self) -> None:
        """Sample the load from the actors' plain state; log the interval's warnings."""
        pool, buffer, counts = self.metrics.pool, self.metrics.buffer, self.metrics.event_counts
        if pool is None or buffer is None:
            return
        now = time.monotonic()
        self._saturation.observe(
            Sample(
                slots=pool.size,
                running=len(pool.running),
                waiting_for_slot=len(pool.waiting),
                awaiting_commit=buffer.held,
                commit_batch_size=buffer.batch_size,
                commit_failing=buffer.failing,
                events_dropped=counts()["dropped"] if counts is not None else 0,
                heartbeat_age_s=now - self._last_beat,
                heartbeat_interval_s=self.settings.worker.heartbeat_interval_s,
            )
        )
        for line in self._saturation.report(now, self._ready_steps):
            logger.warning(line)

    def _ready_steps(self) -> int | None:
        figures = self.metrics.queue.figures() if self.metrics.queue is not None else None
        return None if figures is None else sum(figures.ready.values())

    def _crash(self, dead: list[str]) -> None:
        self.failure = self._failure_of(dead)
        logger.error("{}; stopping the worker in order", self.failure)
        self.stop_requested.set()
        # The error is raised again to whoever calls serve() or stop().
        with contextlib.suppress(DuplexError):
            self.stop()

    def _failure_of(self, dead: list[str]) -> ActorFailure:
        """What killed the actors found dead, as their own report says when there is one."""
        # pykka marks an actor stopped a moment before it runs ``on_failure``, which
        # reports why: wait for that report rather than call the failure unexplained.
        if dead and not self.supervisor.failed.is_set():
            self.supervisor.failed.wait(_FAILURE_REPORT_GRACE_S)
        return self.supervisor.first_failure() or ActorFailure(
            ", ".join(dead), "it stopped unexpectedly"
        )

    def _beat(self) -> None:
        """The heartbeat thread: it needs no actor, so a saturated worker still beats."""
        interval = self.settings.worker.heartbeat_interval_s
        next_beat = time.monotonic() + interval
        # A fixed rate: the time a write takes (the GIL is busy under load) is not added on.
        while not self._closing.wait(max(0.0, next_beat - time.monotonic())):
            self._heartbeat()
            next_beat = max(next_beat + interval, time.monotonic())

    def open_work(self) -> int:
        """Count the steps of this worker's namespaces that could still run."""
        with self.db.read() as conn:
            return count_open_work(conn, self.settings.worker.namespaces)

    def _idle(self) -> bool:
        try:
            with self.db.read() as conn:
                open_work = count_open_work(conn, self.settings.worker.namespaces)
            return (
                open_work == 0
                and self.actors is not None
                and not self.status()["completion"]["buffered"]
            )
        except (StorageError, pykka.ActorDeadError, pykka.Timeout):
            return False

    def _heartbeat(self) -> None:
        silent_s = time.monotonic() - self._last_beat
        timeout_s = self.settings.event_system.claim_timeout_s
        if silent_s > timeout_s:
            # A pause (SIGSTOP, swap, a stalled disk) longer than the liveness timeout: other
            # workers may have recovered this worker's running attempts, whose late results
            # the commit guard now rejects. New work is served as usual.
            logger.warning(
                "this worker was silent for {:.1f}s, longer than event_system.claim_timeout_s "
                "({:g}s): it was presumed dead and its running steps may have been recovered",
                silent_s,
                timeout_s,
            )
        stats = dict(self._stats)
        abandoned = stats.get("dispatcher", {}).get("abandoned_threads", 0)
        if abandoned:
            logger.warning("{} abandoned handler thread(s) still running", abandoned)
        try:
            with self.db.write() as conn:
                record_heartbeat(conn, self.worker_id, now=utcnow(), stats=stats)
        except StorageError as exc:
            logger.warning("heartbeat failed: {}", exc)
            return
        self._last_beat = time.monotonic()

    def _mark_stopped(self, stats: dict[str, Any]) -> None:
        if not self._row_may_exist:  # marking a row that was never written changes nothing
            return
        try:
            with self.db.write() as conn:
                mark_worker_stopped(conn, self.worker_id, now=utcnow(), stats=stats)
        except StorageError as exc:
            logger.warning("could not mark worker stopped: {}", exc)
