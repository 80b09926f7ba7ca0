"""The running flow of actors: started in one linear function, drained in stages on stop.

Each stage is a function of the actors' proxies; the worker runs them in order
(``Worker.stop``). A stage goes on past an actor that died or hangs: ``run_stage`` logs it and
the next stage runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pykka
from loguru import logger

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
from duplex.clock import Timer
from duplex.commit.buffer import CommitBuffer
from duplex.commit.retry import RetryPolicy
from duplex.dispatch.pool import HandlerPool
from duplex.errors import StorageError
from duplex.events.wiring import build_relay, listen_for_events
from duplex.handlers import HandlerRegistry
from duplex.messages import Shutdown, Status
from duplex.observability.counters import EventCounts
from duplex.observability.metrics import WorkerMetrics
from duplex.observability.tracing import StepTracer
from duplex.settings import Settings
from duplex.storage.db import Database
from duplex.storage.step_store import DatabaseStepStore
from duplex.subscriptions import SubscriberRegistry
from duplex.worker.listening import intake_signals
from duplex.worker.supervision import Supervisor

ASK_TIMEOUT_S = 10.0


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


@dataclass(frozen=True)
class FlowParts:
    """What the actors of one worker share: its identity, its registries, its timer and its
    observers."""

    worker_id: str
    registry: HandlerRegistry
    subscribers: SubscriberRegistry
    observer: CommitObserver | None
    supervisor: Supervisor
    timer: Timer
    metrics: WorkerMetrics
    tracer: StepTracer | None


def start_actors(
    settings: Settings, db: Database, parts: FlowParts, started: list[pykka.ActorRef[Any]]
) -> tuple[Actors, list[pykka.ActorRef[Any]]]:
    """Start the actors downstream first, each given the proxies of the next ones.

    Every actor started is appended to ``started`` at once, so that a start failing half-way
    can stop them. Returns the proxies and the refs in flow order (intake first).
    """
    cfg = settings.worker
    timer, supervisor = parts.timer, parts.supervisor
    # The actors' plain state that the observers read in place (no message).
    pool = HandlerPool(cfg.max_concurrent_handlers)
    buffer = CommitBuffer(cfg.commit_batch_size, cfg.commit_linger_ms / 1000)
    event_counts = EventCounts()
    parts.metrics.attach(pool=pool, buffer=buffer, events=event_counts)
    relay = None
    if settings.relay.enabled:
        relay = RelayActor.start(
            build_relay(db, settings.relay),
            timer,
            listen=listen_for_events(db),
            supervisor=supervisor,
        )
        started.append(relay)
    relay_proxy = RelayActorProxy.of(relay) if relay is not None else None
    publisher = DomainEventPublisher.start(
        parts.subscribers,
        buffer_size=settings.domain_events.buffer_size,
        supervisor=supervisor,
        counts=event_counts,
        relay=relay_proxy,
    )
    started.append(publisher)
    completion = CompletionProcessor.start(
        db,
        publisher.proxy(),
        timer,
        buffer=buffer,
        policy=RetryPolicy.from_settings(settings.retry),
        claim_timeout_s=settings.event_system.claim_timeout_s,
        worker_id=parts.worker_id,
        observer=parts.observer,
        supervisor=supervisor,
        metrics=parts.metrics,
        tracer=parts.tracer,
        namespaces=cfg.namespaces,
        eager_limit=cfg.max_concurrent_handlers if cfg.eager_dispatch else 0,
        priority_aging=timedelta(milliseconds=cfg.priority_aging_ms),
    )
    started.append(completion)
    dispatcher = Dispatcher.start(
        completion.proxy(),
        parts.registry,
        timer,
        pool=pool,
        default_timeout_s=cfg.handler_timeout_ms / 1000,
        max_result_bytes=cfg.max_result_bytes,
        max_batch_items=cfg.max_batch_items,
        # Handlers save checkpoints and read batch results on their own threads, each in a
        # short transaction of its own, beside the commit path.
        store=DatabaseStepStore(db),
        prefetch=cfg.prefetch,
        supervisor=supervisor,
        tracer=parts.tracer,
    )
    started.append(dispatcher)
    executor = StepExecutor.start(
        db,
        dispatcher.proxy(),
        worker_id=parts.worker_id,
        namespaces=cfg.namespaces,
        supervisor=supervisor,
        metrics=parts.metrics,
        priority_aging=timedelta(milliseconds=cfg.priority_aging_ms),
    )
    started.append(executor)
    commands = CommandProcessor.start(executor.proxy(), dispatcher.proxy(), supervisor)
    started.append(commands)
    polling, listen = intake_signals(settings, db, parts.worker_id)
    intake = EventSystem.start(
        commands.proxy(),
        timer,
        slots=cfg.max_concurrent_handlers,
        max_prefetch=cfg.prefetch,
        polling_interval_s=settings.event_system.polling_interval_ms / 1000,
        polling=polling,
        listen=listen,
        supervisor=supervisor,
    )
    started.append(intake)
    refs: list[pykka.ActorRef[Any]] = [
        intake,
        commands,
        executor,
        dispatcher,
        completion,
        publisher,
    ]
    if relay is not None:
        refs.append(relay)
    actors = Actors(
        EventSystemProxy.of(intake),
        CommandProcessorProxy.of(commands),
        StepExecutorProxy.of(executor),
        DispatcherProxy.of(dispatcher),
        CompletionProcessorProxy.of(completion),
        DomainEventPublisherProxy.of(publisher),
        relay_proxy,
    )
    return actors, refs


def connect_back_edges(actors: Actors) -> None:
    """Wire the calls that run back up the flow: credits and nudges return to the intake,
    and dependents claimed by commits go to the Dispatcher."""
    pykka.get_all(
        [
            actors.step_executor.connect(actors.event_system),
            actors.dispatcher.connect(actors.event_system),
            actors.completion.connect(actors.event_system, actors.dispatcher),
        ]
    )


def stop_actors(refs: Iterable[pykka.ActorRef[Any]]) -> None:
    """Stop ``refs`` in that order, waiting for each; one that hangs is logged and passed."""
    for ref in refs:
        try:
            ref.stop(block=True, timeout=ASK_TIMEOUT_S)
        except pykka.Timeout:
            logger.error("{} did not stop in time", ref.actor_class.__name__)


def run_stage(what: str, action: Callable[[], object]) -> None:
    """Run one stage of the stop; an actor that died or hangs is logged, then passed."""
    try:
        action()
    except (pykka.ActorDeadError, pykka.Timeout, StorageError) as exc:
        logger.error("stop: could not {}: {}", what, str(exc) or type(exc).__name__)


def stop_intake(actors: Actors) -> None:
    """Claim nothing more: neither the intake nor the commits (eager claims)."""
    actors.event_system.stop_intake().get(timeout=ASK_TIMEOUT_S)
    # Once this returns, every step a commit claimed is on its way to the Dispatcher, ahead
    # of the drain of the next stage, which hands back what never started.
    actors.completion.stop_eager_claims().get(timeout=ASK_TIMEOUT_S)


def hand_back_unstarted(actors: Actors) -> None:
    """Hand claimed steps that never started back to the queue."""
    # Barriers: a claim command already on its way must reach the Dispatcher before the
    # drain, so that what it claimed is handed back rather than stranded.
    run_stage(
        "wait for claim commands in flight",
        lambda: actors.command_processor.handle(Status()).get(timeout=ASK_TIMEOUT_S),
    )
    run_stage(
        "wait for claims in flight",
        lambda: actors.step_executor.claimed_total.get(timeout=ASK_TIMEOUT_S),
    )
    try:
        actors.command_processor.handle(Shutdown()).get(timeout=ASK_TIMEOUT_S)
    except pykka.ActorDeadError:
        actors.dispatcher.drain().get(timeout=ASK_TIMEOUT_S)


def finish_handlers(actors: Actors, supervisor: Supervisor, deadline: float) -> None:
    """Wait for running handlers until ``deadline``; then settle what still runs."""
    if not actors.dispatcher.actor_ref.is_alive():
        # The Dispatcher died: wait for the handler workers it left running (a stop
        # message queues behind the attempt in progress).
        for ref in supervisor.orphans():
            try:
                ref.stop(block=True, timeout=max(0.01, deadline - time.monotonic()))
            except pykka.Timeout:
                supervisor.results_lost(1)
        return
    dispatcher = actors.dispatcher
    while dispatcher.stats().get(timeout=ASK_TIMEOUT_S)["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    abandoned = dispatcher.abandon_running().get(timeout=ASK_TIMEOUT_S)
    if abandoned:
        logger.warning("{} handler(s) still running at shutdown timeout", abandoned)
    # Once a worker has stopped, the result it sent is in the CompletionProcessor's
    # mailbox, ahead of anything asked of it from here on.
    for ref in dispatcher.live_workers().get(timeout=ASK_TIMEOUT_S):
        ref.stop(block=True, timeout=ASK_TIMEOUT_S)


def commit_everything(actors: Actors, deadline: float, held: Callable[[], int]) -> int:
    """Commit every result the CompletionProcessor holds; return how many are left.

    ``held`` counts what it holds, read without asking it (for when it does not answer).
    """
    # At least one try, even when the handlers used up the shutdown timeout.
    budget = max(0.5, deadline - time.monotonic())
    try:
        left: int = actors.completion.drain(budget).get(timeout=budget + ASK_TIMEOUT_S)
    except pykka.ActorDeadError:
        return 0  # what it held is counted by its salvage (Supervisor.lost)
    except pykka.Timeout:
        logger.error("stop: the CompletionProcessor did not finish committing in time")
        return held() or 1
    return left


def final_stats(actors: Actors, identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` and the counters of every actor still alive (a dead one's part is left
    out)."""
    return {
        **identity,
        **_counters(
            ("dispatcher", actors.dispatcher.stats),
            ("completion", actors.completion.stats),
            ("events", actors.publisher.stats),
            *((("relay", actors.relay.stats),) if actors.relay is not None else ()),
        ),
    }


def event_stats(actors: Actors) -> dict[str, Any]:
    """The publisher's counters as ``final_stats`` gives them (nothing from a dead one)."""
    return _counters(("events", actors.publisher.stats))


def _counters(*asks: tuple[str, Callable[[], Any]]) -> dict[str, Any]:
    """Each ask's answer under its key; an actor dead or too slow to answer is left out."""
    parts: dict[str, Any] = {}
    for key, ask in asks:
        with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
            parts[key] = ask().get(timeout=ASK_TIMEOUT_S)
    return parts


def deliver_events(actors: Actors, deadline: float) -> None:
    """Deliver the committed events in process, then (best effort) to the broker."""
    run_stage(
        "deliver committed events",
        lambda: actors.publisher.close(timeout_s=5.0).get(timeout=10.0),
    )
    if actors.relay is not None:
        relay = actors.relay
        # Best effort: what is left stays in the table for the next relay.
        budget = min(5.0, max(0.5, deadline - time.monotonic()))
        run_stage(
            "publish committed events to the broker",
            lambda: relay.drain(budget).get(timeout=budget + ASK_TIMEOUT_S),
        )


def collect_status(actors: Actors, identity: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Every actor's counters (asked from outside the actors), after ``identity``."""
    dispatcher_future = actors.command_processor.handle(Status()).get(timeout=timeout_s)
    return {
        **identity,
        "dispatcher": dispatcher_future.get(timeout=timeout_s),
        "completion": actors.completion.stats().get(timeout=timeout_s),
        "events": actors.publisher.stats().get(timeout=timeout_s),
        "intake": actors.event_system.stats().get(timeout=timeout_s),
        **(
            {"relay": actors.relay.stats().get(timeout=timeout_s)}
            if actors.relay is not None
            else {}
        ),
    }
