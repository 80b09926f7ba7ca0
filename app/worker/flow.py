"""The running flow of actors, and the stages that drain it when the worker stops.

Each stage is a function of the actors' proxies; the worker runs them in order
(``Worker.stop``). A stage goes on past an actor that died or hangs: ``run_stage`` logs it and
the next stage runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka
from loguru import logger

from duplex.actors.command_processor import CommandProcessorProxy
from duplex.actors.completion_processor import CompletionProcessorProxy
from duplex.actors.dispatcher import DispatcherProxy
from duplex.actors.event_publisher import DomainEventPublisherProxy
from duplex.actors.event_system import EventSystemProxy
from duplex.actors.relay import RelayActorProxy
from duplex.actors.step_executor import StepExecutorProxy
from duplex.errors import StorageError
from duplex.messages import Shutdown, Status
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


def run_stage(what: str, action: Callable[[], object]) -> None:
    """Run one stage of the stop; an actor that died or hangs is logged, then passed."""
    try:
        action()
    except (pykka.ActorDeadError, pykka.Timeout, StorageError) as exc:
        logger.error("stop: could not {}: {}", what, str(exc) or type(exc).__name__)


def stop_intake(actors: Actors) -> None:
    actors.event_system.stop_intake().get(timeout=ASK_TIMEOUT_S)


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
    parts = dict(identity)
    for key, ask in (
        ("dispatcher", actors.dispatcher.stats),
        ("completion", actors.completion.stats),
        ("events", actors.publisher.stats),
        *((("relay", actors.relay.stats),) if actors.relay is not None else ()),
    ):
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
