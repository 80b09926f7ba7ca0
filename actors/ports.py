"""The calls that run back up the flow, as the actors that make them see them.

Messages flow down: EventSystem → CommandProcessor → StepExecutor → Dispatcher →
HandlerWorker, and Dispatcher/HandlerWorker → CompletionProcessor → DomainEventPublisher →
RelayActor; an actor module imports only modules further down. A few calls go back up
(claims made, slots freed, nudges, dependents claimed in a commit handed to the Dispatcher):
each is a small protocol here, satisfied by the upstream actor's proxy, so the sender names
what it calls without importing the actor it calls.
"""

from __future__ import annotations

from typing import Protocol

from duplex.actors.proxy import Message
from duplex.messages import ClaimedStep
from duplex.storage.cancels import RunningCancel


class ClaimReports(Protocol):
    """What the StepExecutor tells the EventSystem about its claims."""

    @property
    def claimed(self) -> Message[[int, int], None]:
        """``claimed(requested, got)``: a claim finished."""
        ...

    @property
    def claim_failed(self) -> Message[[int], None]:
        """``claim_failed(requested)``: the database failed the claim."""
        ...

    @property
    def look_at(self) -> Message[[float], None]:
        """``look_at(delay_s)``: candidates wait for rate limit tokens that come then."""
        ...


class CapacityReports(Protocol):
    """What the Dispatcher tells the EventSystem when slots free up."""

    @property
    def capacity_freed(self) -> Message[[int, int | None], None]:
        """``capacity_freed(slots, prefetch)``: ``slots`` credits are free; the window size."""
        ...


class CommitSignals(Protocol):
    """What the CompletionProcessor tells the EventSystem after and around commits."""

    @property
    def nudge(self) -> Message[[], None]:
        """Commits made work ready (or a retry fell due): look for it now."""
        ...

    @property
    def commits_lagging(self) -> Message[[bool], None]:
        """Uncommitted results piled up (True) or caught up again (False)."""
        ...

    @property
    def claimed_eagerly(self) -> Message[[int], None]:
        """``claimed_eagerly(n)``: a commit claimed ``n`` dependents; count them as claimed."""
        ...


class DispatchChannel(Protocol):
    """What the CompletionProcessor tells the Dispatcher: dependents a commit claimed, and
    attempts an operator cancelled (found by its sweep)."""

    @property
    def dispatch(self) -> Message[[list[ClaimedStep]], None]:
        """``dispatch(steps)``: run these claimed steps (fire-and-forget)."""
        ...

    @property
    def cancel_attempts(self) -> Message[[list[RunningCancel]], int]:
        """``cancel_attempts(requests)``: cancel these attempts if they still run here."""
        ...


class SlotReports(Protocol):
    """What a HandlerWorker tells the Dispatcher that owns its slot."""

    @property
    def slot_freed(self) -> Message[[int, str, int], None]:
        """``slot_freed(worker_id, step_uuid, attempt)``: the attempt finished."""
        ...

    @property
    def worker_failed(self) -> Message[[int], None]:
        """``worker_failed(worker_id)``: the worker actor died outside any handler."""
        ...
