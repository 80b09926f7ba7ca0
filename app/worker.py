"""The long-lived worker: start the actors in one linear function, stop them in reverse.

Flow (DESIGN.md section 1):
EventSystem -> CommandProcessor -> StepExecutor -> Dispatcher (dispatch channel) ->
HandlerWorker -> CompletionProcessor (completion channel) -> DomainEventPublisher.
"""

from __future__ import annotations

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
from sqlalchemy import insert, update

from actors.command_processor import CommandProcessor, CommandProcessorProxy
from actors.completion_processor import (
    CommitObserver,
    CompletionProcessor,
    CompletionProcessorProxy,
)
from actors.dispatcher import Dispatcher, DispatcherProxy
from actors.event_publisher import DomainEventPublisher, DomainEventPublisherProxy
from actors.event_system import EventSystem, EventSystemProxy
from actors.step_executor import StepExecutor, StepExecutorProxy
from app.claims import count_open_work
from app.db import Database
from app.errors import DuplexError, StorageError
from app.handlers import HandlerRegistry
from app.handlers import registry as default_registry
from app.messages import JSONDict, Shutdown, Status
from app.models import utcnow, workers
from app.notifications import WorkListener
from app.retry import RetryPolicy
from app.settings import Settings
from app.submission import create_task
from app.subscriptions import SubscriberRegistry
from app.subscriptions import subscribers as default_subscribers
from app.templates import TaskTemplate
from app.timer import Timer

_ASK_TIMEOUT_S = 10.0


class WorkerCrashedError(DuplexError):
    """One of the worker's actors died; the worker stops rather than run crippled."""


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


class Worker:
    """One Duplex worker process: its actors, its heartbeat and its graceful stop."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        registry: HandlerRegistry = default_registry,
        subscribers: SubscriberRegistry = default_subscribers,
        observer: CommitObserver | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.worker_id = settings.worker.id or new_worker_id()
        self.registry = registry
        self.subscribers = subscribers
        self.observer = observer
        self.stop_requested = threading.Event()
        self.timer: Timer | None = None
        self.actors: Actors | None = None
        self._refs: list[pykka.ActorRef[Any]] = []

    def start(self) -> Actors:
        """Register the worker and start the actors, downstream first, wiring proxies."""
        cfg = self.settings.worker
        self._register()
        self.timer = Timer()
        publisher = DomainEventPublisher.start(
            self.subscribers, buffer_size=self.settings.domain_events.buffer_size
        )
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
        )
        dispatcher = Dispatcher.start(
            completion.proxy(),
            self.registry,
            self.timer,
            size=cfg.max_concurrent_handlers,
            default_timeout_s=cfg.handler_timeout_ms / 1000,
            max_result_bytes=cfg.max_result_bytes,
        )
        executor = StepExecutor.start(
            self.db, dispatcher.proxy(), worker_id=self.worker_id, namespaces=cfg.namespaces
        )
        commands = CommandProcessor.start(executor.proxy(), dispatcher.proxy())
        polling, listen = self._intake_signals()
        intake = EventSystem.start(
            commands.proxy(),
            self.timer,
            capacity=cfg.max_concurrent_handlers + cfg.prefetch,
            polling_interval_s=self.settings.event_system.polling_interval_ms / 1000,
            polling=polling,
            listen=listen,
        )
        self._refs = [intake, commands, executor, dispatcher, completion, publisher]
        self.actors = Actors(
            intake.proxy(),
            commands.proxy(),
            executor.proxy(),
            dispatcher.proxy(),
            completion.proxy(),
            publisher.proxy(),
        )
        # Back-edges of the flow: credits and nudges return to the intake.
        pykka.get_all(
            [
                self.actors.step_executor.connect(self.actors.event_system),
                self.actors.dispatcher.connect(self.actors.event_system),
                self.actors.completion.connect(self.actors.event_system),
            ]
        )
        self.actors.event_system.begin.defer()
        logger.info(
            "worker {} started: {} handler slots, namespaces {}, handlers {}",
            self.worker_id,
            cfg.max_concurrent_handlers,
            list(cfg.namespaces),
            self.registry.names(),
        )
        return self.actors

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
        """Create a task in this worker's database and wake the intake at once."""
        with self.db.write() as conn:
            task_uuid = create_task(conn, template, context or {}, now=utcnow())
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
            "dispatcher": dispatcher_future.get(timeout=timeout_s),
            "completion": self.actors.completion.stats().get(timeout=timeout_s),
            "events": self.actors.publisher.stats().get(timeout=timeout_s),
        }

    def serve(self, *, until_idle: bool = False, on_tick: Callable[[], None] | None = None) -> None:
        """Run until a stop is requested (or, with ``until_idle``, until no work is left)."""
        cfg = self.settings
        tick_s = min(cfg.worker.heartbeat_interval_s, cfg.event_system.polling_interval_ms / 1000)
        next_heartbeat = next_recovery = time.monotonic()
        recovery_every = max(1.0, cfg.event_system.claim_timeout_s / 4)
        while not self.stop_requested.wait(tick_s):
            self._check_actors()
            now = time.monotonic()
            if now >= next_heartbeat:
                self._heartbeat()
                next_heartbeat = now + cfg.worker.heartbeat_interval_s
            if now >= next_recovery and self.actors is not None:
                self.actors.completion.recover_stale_claims.defer()
                next_recovery = now + recovery_every
            if on_tick is not None:
                on_tick()
            if until_idle and self._idle():
                logger.info("no work left that could run; stopping (--until-idle)")
                return

    def stop(self) -> dict[str, Any]:
        """Drain: stop intake, hand back unstarted claims, let handlers finish, commit, deliver.

        Each stage tolerates an actor that already died, so a crash still ends in an orderly
        exit with everything that can be committed committed.
        """
        if self.actors is None:
            return {}
        actors = self.actors
        deadline = time.monotonic() + self.settings.worker.shutdown_timeout_ms / 1000
        final: dict[str, Any] = {}
        try:
            actors.event_system.stop_intake().get(timeout=_ASK_TIMEOUT_S)
            # Barriers: a claim command already on its way must reach the Dispatcher before
            # the drain, so that what it claimed is handed back rather than stranded.
            actors.command_processor.handle(Status()).get(timeout=_ASK_TIMEOUT_S)
            actors.step_executor.claimed_total.get(timeout=_ASK_TIMEOUT_S)
            actors.command_processor.handle(Shutdown()).get(timeout=_ASK_TIMEOUT_S)
            while (
                actors.dispatcher.stats().get(timeout=_ASK_TIMEOUT_S)["running"]
                and time.monotonic() < deadline
            ):
                time.sleep(0.02)
            abandoned = actors.dispatcher.abandon_running().get(timeout=_ASK_TIMEOUT_S)
            if abandoned:
                logger.warning("{} handler(s) still running at shutdown timeout", abandoned)
            # Once a worker has stopped, the result it sent is in the CompletionProcessor's
            # mailbox, ahead of anything asked of it from here on.
            for ref in actors.dispatcher.live_workers().get(timeout=_ASK_TIMEOUT_S):
                ref.stop(block=True, timeout=_ASK_TIMEOUT_S)
            self._wait_for_commits(
                timeout_s=max(5.0, self.settings.worker.shutdown_timeout_ms / 1000)
            )
            final = self.status()
            actors.publisher.close(timeout_s=5.0).get(timeout=10.0)
        except (pykka.ActorDeadError, pykka.Timeout) as exc:
            logger.error("orderly stop interrupted ({}); stopping what is left", exc)
        finally:
            for ref in self._refs:
                try:
                    ref.stop(block=True, timeout=_ASK_TIMEOUT_S)
                except pykka.Timeout:
                    logger.error("{} did not stop in time", ref.actor_class.__name__)
            if self.timer is not None:
                self.timer.stop()
            self._mark_stopped(final)
            self.actors = None
        logger.info("worker {} stopped", self.worker_id)
        return final

    def _check_actors(self) -> None:
        dead = [ref.actor_class.__name__ for ref in self._refs if not ref.is_alive()]
        if dead:
            raise WorkerCrashedError(
                f"actor {', '.join(dead)} stopped unexpectedly (its error is logged above)"
            )

    def _wait_for_commits(self, timeout_s: float) -> None:
        assert self.actors is not None
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.actors.completion.stats().get(timeout=_ASK_TIMEOUT_S)["buffered"] == 0:
                return
            time.sleep(0.02)
        left = self.actors.completion.stats().get(timeout=_ASK_TIMEOUT_S)["buffered"]
        logger.error(
            "{} result(s) could not be committed before exit; their steps are recovered by the "
            "stale-claim rule",
            left,
        )

    def _idle(self) -> bool:
        try:
            with self.db.read() as conn:
                open_work = count_open_work(conn, self.settings.worker.namespaces)
        except StorageError:
            return False
        return (
            open_work == 0
            and self.actors is not None
            and not self.status()["completion"]["buffered"]
        )

    def _register(self) -> None:
        now = utcnow()
        with self.db.write() as conn:
            conn.execute(
                insert(workers).values(
                    worker_id=self.worker_id,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    started_at=now,
                    heartbeat_at=now,
                    stats={},
                )
            )

    def _heartbeat(self) -> None:
        try:
            stats = self.status()
        except pykka.Timeout:
            stats = {"status": "timeout"}
        abandoned = stats.get("dispatcher", {}).get("abandoned_threads", 0)
        if abandoned:
            logger.warning("{} abandoned handler thread(s) still running", abandoned)
        try:
            with self.db.write() as conn:
                conn.execute(
                    update(workers)
                    .where(workers.c.worker_id == self.worker_id)
                    .values(heartbeat_at=utcnow(), stats=stats)
                )
        except StorageError as exc:
            logger.warning("heartbeat failed: {}", exc)

    def _mark_stopped(self, stats: dict[str, Any]) -> None:
        try:
            with self.db.write() as conn:
                conn.execute(
                    update(workers)
                    .where(workers.c.worker_id == self.worker_id)
                    .values(stopped_at=utcnow(), heartbeat_at=utcnow(), stats=stats)
                )
        except StorageError as exc:
            logger.warning("could not mark worker stopped: {}", exc)
