"""Intake credits: how many steps the worker may claim now.

The worker never holds more claimed steps than ``max_concurrent_handlers + prefetch``; the
database is the buffer, so a backlog of 100k steps does not grow the worker's memory.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IntakeCredits:
    """Free capacity, and whether a claim is already on its way."""

    capacity: int
    # A claim is a write transaction whatever its size: with claimed steps still waiting to
    # run, waiting for this many free credits costs no handler time and saves transactions.
    min_claim: int = 1
    available: int = -1
    claim_in_flight: bool = False
    # True when the last claim filled up (the queue probably holds more) or work was
    # signalled since: claim as soon as capacity frees instead of waiting for the next poll.
    backlog_likely: bool = True
    stopped: bool = False
    # Work was signalled while a claim was on its way; that claim may have looked too early.
    signalled_during_claim: bool = False
    # Results are waiting for the database: claim nothing more until commits catch up, so the
    # results held in memory stay bounded even when handlers outrun commits.
    commits_lagging: bool = False

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("capacity must be >= 1")
        if not 1 <= self.min_claim <= self.capacity:
            raise ValueError("min_claim must be between 1 and capacity")
        if self.available < 0:
            self.available = self.capacity

    def next_claim(self, *, work_signalled: bool) -> int:
        """Return how many steps to claim now (0 for none) and reserve them.

        A signal that cannot be served at once is remembered, never dropped: it is served
        when the claim on its way returns or when capacity frees.
        """
        if work_signalled:
            if self.claim_in_flight:
                self.signalled_during_claim = True
            else:
                self.backlog_likely = True
        if (
            self.stopped
            or self.commits_lagging
            or self.claim_in_flight
            or self.available < self.min_claim
            or not self.backlog_likely
        ):
            return 0
        self.claim_in_flight = True
        limit, self.available = self.available, 0
        return limit

    def claimed(self, requested: int, got: int) -> None:
        """Account for a finished claim: unclaimed credits come back."""
        self.claim_in_flight = False
        self.available += requested - got
        self.backlog_likely = got >= requested or self.signalled_during_claim
        self.signalled_during_claim = False

    def freed(self, slots: int = 1) -> None:
        """Account for capacity given back by the dispatcher."""
        self.available = min(self.capacity, self.available + slots)

    def stop(self) -> None:
        self.stopped = True
