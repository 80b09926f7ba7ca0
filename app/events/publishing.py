"""One batch of the relay, as plain logic: messages, in-order runs, failures and backoff.

An event's message carries its id as ``message_id``, so a consumer can drop the copies
at-least-once delivery allows. Each task's run is published in sequence order and cut at the
first refusal: the task's later events wait behind the refused one. ``duplex.events.relay``
selects the runs and records what this module reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from loguru import logger

from duplex.errors import BrokerUnavailableError, PublishRejectedError
from duplex.events.broker import Message, PublishRejected, body_of
from duplex.storage.outbox import OutboxEvent, PublishFailure


class Publisher(Protocol):
    """Publishes one message and returns once the broker confirmed it."""

    usable: bool

    def publish(self, message: Message) -> None: ...

    def keepalive(self) -> None: ...

    def close(self) -> None: ...


def envelope(event: OutboxEvent) -> dict[str, Any]:
    """The JSON body of an event's message."""
    return {
        "event_id": event.event_id,
        "name": event.name,
        "task_uuid": event.task_uuid,
        "step_uuid": event.step_uuid,
        "namespace": event.namespace,
        "sequence": event.sequence,
        "committed_at": event.created_at.isoformat(),
        "payload": event.payload,
    }


def message_of(event: OutboxEvent) -> Message:
    """The AMQP message of an event: routing key = event name, message id = event id."""
    return Message(
        routing_key=event.name,
        body=body_of(envelope(event)),
        message_id=event.event_id,
        type=event.name,
        timestamp=int(event.created_at.timestamp()),
        headers={
            "task_uuid": event.task_uuid,
            "step_uuid": event.step_uuid,
            "namespace": event.namespace,
            "sequence": event.sequence,
        },
    )


class Backoff:
    """Exponential delays: ``base``, doubling, capped at ``maximum``; reset on success."""

    def __init__(self, base_s: float, maximum_s: float) -> None:
        self.base_s = base_s
        self.maximum_s = max(base_s, maximum_s)
        self.failures = 0

    def delay(self, failures: int) -> float:
        return float(min(self.maximum_s, self.base_s * 2 ** max(0, failures - 1)))

    def failed(self) -> float:
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        self.failures = 0


@dataclass
class BatchOutcome:
    """What one batch did."""

    selected: int = 0
    published: list[str] = field(default_factory=list)
    failures: list[PublishFailure] = field(default_factory=list)
    unroutable: int = 0
    broker_error: BrokerUnavailableError | None = None


def publish_runs(
    runs: Sequence[Sequence[OutboxEvent]],
    publisher: Publisher,
    *,
    unroutable_as_published: bool,
    failure: Callable[[OutboxEvent, str], PublishFailure],
) -> BatchOutcome:
    """Publish each task's run in sequence order; cut a run at its first refused event.

    ``failure`` describes a refused event (its attempts, retry time or dead letter). A broker
    that goes away ends the batch: what it confirmed so far is in the outcome, to be recorded.
    """
    outcome = BatchOutcome(selected=sum(len(run) for run in runs))
    for run in runs:
        for event in run:
            try:
                publisher.publish(message_of(event))
            except PublishRejectedError as exc:
                unroutable = isinstance(exc, PublishRejected) and exc.unroutable
                if unroutable and unroutable_as_published:
                    outcome.published.append(event.event_id)
                    outcome.unroutable += 1
                    continue
                outcome.failures.append(failure(event, str(exc)))
                break  # the task's later events wait behind this one
            except BrokerUnavailableError as exc:
                # What was confirmed so far is still recorded; the rest stays for later.
                outcome.broker_error = exc
                return outcome
            outcome.published.append(event.event_id)
    return outcome


def publish_failure(
    event: OutboxEvent,
    error: str,
    *,
    max_attempts: int,
    backoff: Backoff,
    clock: Callable[[], datetime],
) -> PublishFailure:
    """One more failed attempt of ``event``: due again after its backoff, or dead-lettered
    once it has had ``max_attempts``."""
    attempts = event.publish_attempts + 1
    dead = attempts >= max_attempts
    retry_at = None if dead else clock() + timedelta(seconds=backoff.delay(attempts))
    if dead:
        logger.error(
            "event {} ({} of task {}, sequence {}) dead-lettered after {} attempt(s): {}; "
            "the task's later events wait (duplex events retry|skip {})",
            event.event_id,
            event.name,
            event.task_uuid,
            event.sequence,
            attempts,
            error,
            event.event_id,
        )
    else:
        logger.warning(
            "event {} ({}) not published (attempt {} of {}): {}",
            event.event_id,
            event.name,
            attempts,
            max_attempts,
            error,
        )
    return PublishFailure(event.event_id, attempts, error, retry_at, dead)
