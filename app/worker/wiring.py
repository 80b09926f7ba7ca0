"""The long-lived worker (``Worker``): registration, actors, heartbeat and watchdog, the stop.

Flow (docs/architecture.md, The flow):
EventSystem -> CommandProcessor -> StepExecutor -> Dispatcher (dispatch channel) ->
HandlerWorker -> CompletionProcessor (completion channel) -> DomainEventPublisher ->
RelayActor (when ``[relay] enabled``).

The actors start in one linear function and stop in stages, both in ``duplex.worker.flow``,
which also makes the plain state the observers read (the handler pool, the commit buffer,
the event counts) and hands it both to its actor and to ``Worker.metrics``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import pykka
from loguru import logger

from duplex.actors.completion_processor import CommitObserver
from duplex.actors.supervised import tell
from duplex.clock import Timer, utcnow
from duplex.errors import (
    DuplexError,
    StorageError,
    UncommittedResultsError,
    WorkerCrashedError,
)
from duplex.handlers import HandlerRegistry
from duplex.handlers import registry as default_registry
from duplex.messages import JSONDict
from duplex.observability.http import HttpServer
from duplex.observability.tracing import current_carrier
from duplex.settings import Settings
from duplex.storage.db import Database
from duplex.storage.queries import count_open_work
from duplex.storage.rate_limits import declare_limits
from duplex.storage.submission import create_task
from duplex.subscriptions import SubscriberRegistry
from duplex.subscriptions import subscribers as default_subscribers
from duplex.templates import TaskTemplate
from duplex.worker import flow
from duplex.worker.flow import ASK_TIMEOUT_S, Actors, FlowParts, run_stage
from duplex.worker.health import HealthSnapshot, Phase
from duplex.worker.observers import Observers
from duplex.worker.scheduling import schedule_firer
from duplex.worker.supervision import ActorFailure, Supervisor
from duplex.worker.watchdog import Watchdog, dead_actors, failure_of, new_worker_id

_STATS_TIMEOUT_S = 1.0


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
        self._registered = False
        # Set when a start failed half-way: the row says stopped, so this worker never serves.
        self._start_failed = False
        self.observers = Observers(
            settings,
            db,
            self.worker_id,
            draining=lambda: self.phase == "draining",
            tracer_provider=tracer_provider,
        )
        # The one view of the figures (``duplex run`` shows its progress from it).
        self.metrics = self.observers.metrics
        self.heartbeat = self.observers.heartbeat
        self.tracer = self.observers.tracer

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
        actors, self._refs = flow.start_actors(
            self.settings,
            self.db,
            FlowParts(
                worker_id=self.worker_id,
                registry=self.registry,
                subscribers=self.subscribers,
                observer=self.observer,
                supervisor=self.supervisor,
                timer=self.timer,
                metrics=self.metrics,
                tracer=self.tracer,
            ),
            started,
        )
        self.actors = actors
        flow.connect_back_edges(actors)
        # A restart after a crash on this host resumes the dead worker's steps at once.
        try:
            actors.completion.recover_lost_claims().get(timeout=ASK_TIMEOUT_S)
        except pykka.Timeout:
            # The database is slow to answer: the watchdog's next round tries again.
            logger.warning("the first recovery of lost workers' claims did not finish in time")
        if not self._stop_flag:  # a stop asked for during start-up: never begin the intake
            actors.event_system.begin.defer()
        if actors.relay is not None:
            tell(actors.relay.wake)  # publish what earlier runs left unpublished
        watchdog = Watchdog(
            self.supervisor,
            self.heartbeat,
            self.observers.saturation,
            refs=lambda: self._refs,
            running=lambda: self.actors is not None,
            stopping=lambda: self._stopping,
            # Looked up when called, so that a patched ``_crash`` (fault tests) is the one run.
            crash=lambda dead: self._crash(dead),
            recover=lambda: tell(actors.completion.recover_lost_claims),
            collect_stats=lambda: self.status(timeout_s=_STATS_TIMEOUT_S),
            sweep=lambda: tell(actors.completion.sweep_deadlines),
            sweep_every_s=self.settings.worker.deadline_sweep_interval_ms / 1000,
        )
        self._threads = [
            threading.Thread(
                target=self.heartbeat.run, args=(self._closing,), name="duplex-heartbeat"
            ),
            threading.Thread(target=watchdog.run, args=(self._closing,), name="duplex-watchdog"),
            *schedule_firer(self, actors, self._closing),
        ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()
        logger.info(
            "worker {} started: {} handler slots, namespaces {}, handlers {}",
            self.worker_id,
            cfg.max_concurrent_handlers,
            list(cfg.namespaces),
            self.registry.names(),
        )
        return actors

    def _abandon_start(self, started: list[pykka.ActorRef[Any]]) -> None:
        """Undo a start that failed half-way: stop what started, upstream first."""
        self._stop_all(reversed(started))
        self.actors = None
        self._refs = []
        self._start_failed = True
        self.heartbeat.mark_stopped({})

    def register(self) -> None:
        """Record this worker in the ``workers`` table; safe to retry.

        ``duplex run`` calls it with retries before ``start``; ``start`` calls it otherwise.
        """
        self.heartbeat.register()
        with self.db.write() as conn:  # [rate_limits] not in SQL yet (docs/flow-control.md)
            declare_limits(conn, self.settings.rate_limits, now=utcnow())
        self._registered = True

    def serve_http(self) -> None:
        """Open the health and metrics port (``observability.http_port``), if configured.

        ``duplex run`` calls it before migrating, so that a probe sees the worker starting;
        ``start`` calls it otherwise. A port that cannot be bound is a ``ConfigurationError``.
        """
        self.observers.serve_http(self.health_snapshot)

    def close_http(self) -> None:
        self.observers.close_http()

    @property
    def http(self) -> HttpServer | None:
        """The health and metrics port, while it is open."""
        return self.observers.http

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
        failure = self.failure or self.supervisor.first_failure()
        return self.observers.health(
            phase=self.phase,
            failure=None if failure is None else str(failure),
            actors={ref.actor_class.__name__: ref.is_alive() for ref in self._refs},
            running=self.actors is not None,
        )

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
        return flow.collect_status(self.actors, self.observers.identity(), timeout_s)

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
            self.heartbeat.mark_stopped({})
            return {}
        self._stopping = True
        dead = dead_actors(self._refs)
        if dead and self.failure is None:
            # Died before the watchdog looked: the stop still reports it.
            self.failure = failure_of(self.supervisor, dead)
            logger.error("{}; stopping the worker in order", self.failure)
        deadline = time.monotonic() + self.settings.worker.shutdown_timeout_ms / 1000
        final: dict[str, Any] = {"uncommitted": 0}
        try:
            run_stage("stop intake", lambda: flow.stop_intake(actors))
            run_stage("hand back unstarted claims", lambda: flow.hand_back_unstarted(actors))
            run_stage(
                "finish running handlers",
                lambda: flow.finish_handlers(actors, self.supervisor, deadline),
            )
            uncommitted = flow.commit_everything(actors, deadline, self._results_held)
            final.update(flow.final_stats(actors, self.observers.identity()))
            flow.deliver_events(actors, deadline)
            # The events delivered by the stop count too.
            final.update(flow.event_stats(actors))
        except Exception:
            # A bug in a stage must not leave the actors' threads keeping the process alive.
            logger.exception("stop: unexpected error; stopping what is left")
            uncommitted = -1
        finally:
            self._stop_all(self._refs)
        lost = self.supervisor.lost
        final["uncommitted"] = max(uncommitted, 0) + lost
        if uncommitted < 0 or final["uncommitted"]:
            logger.error(
                "{} result(s) could not be committed before exit; their steps will be "
                "recovered as worker_lost by the liveness rule (event_system.claim_timeout_s, "
                "or at once by the next worker started on this host)",
                final["uncommitted"] if uncommitted >= 0 else "some",
            )
        self.heartbeat.mark_stopped(final)
        self.actors = None
        logger.info("worker {} stopped", self.worker_id)
        return final

    def _results_held(self) -> int:
        commit = self.metrics.commit()
        return 0 if commit is None else commit.awaiting

    def _stop_all(self, refs: Iterable[pykka.ActorRef[Any]]) -> None:
        """Stop ``refs`` in that order and every thread of this worker, whatever their state."""
        flow.stop_actors(refs)
        if self.timer is not None:
            self.timer.stop()
        self._closing.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=ASK_TIMEOUT_S)

    def _crash(self, dead: list[str]) -> None:
        self.failure = failure_of(self.supervisor, dead)
        logger.error("{}; stopping the worker in order", self.failure)
        self.stop_requested.set()
        # The error is raised again to whoever calls serve() or stop().
        with contextlib.suppress(DuplexError):
            self.stop()

    def open_work(self) -> int:
        """Count the steps of this worker's namespaces that could still run."""
        with self.db.read() as conn:
            return count_open_work(conn, self.settings.worker.namespaces)

    def _idle(self) -> bool:
        try:
            return (
                self.open_work() == 0
                and self.actors is not None
                and not self.status()["completion"]["buffered"]
            )
        except (StorageError, pykka.ActorDeadError, pykka.Timeout):
            return False
