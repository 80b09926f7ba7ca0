"""Intake credits: how many steps the worker may claim now.

The intake never claims more than the slots plus the prefetch window
(``duplex.intake.prefetch``), which is never more than ``worker.prefetch``; the database is the
buffer, so a backlog of 100k steps does not grow the worker's memory.

Dependents a commit claims for this worker (eager dispatch) are claims the intake did not
make: they are deducted when it hears of them (``claimed_eagerly``), so ``available`` may go
below zero, and the intake waits until enough slots free. Until it hears, it may claim on
credits of the parents those dependents replace: the worker then holds up to that many more
than the slots and the window, for as long as they take to run.
"""

from __future__ import annotations

from dataclasses import dataclass

from duplex.intake.prefetch import claim_batch


@dataclass
class IntakeCredits:
    """Free capacity, and whether a claim is already on its way.

    There is a credit per slot and per step of the largest window; the credits of the
    window's unused part are held back, so a claim never takes more than the slots plus
    the window of the moment.
    """

    slots: int
    max_prefetch: int = 0
    # The prefetch window now (see ``resize``); starts as the Dispatcher's window starts.
    prefetch: int = -1
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
    # Credits given back beyond the capacity and dropped: an accounting error (a claim not
    # counted, a slot freed twice). Zero in a correct worker; shown in the intake's stats.
    excess: int = 0

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError("slots must be >= 1")
        if self.max_prefetch < 0:
            raise ValueError("max_prefetch must be >= 0")
        if self.prefetch < 0:
            self.prefetch = min(self.slots, self.max_prefetch)
        self.resize(self.prefetch)
        if self.available < 0:
            self.available = self.capacity

    @property
    def capacity(self) -> int:
        """Every credit there is: the slots and the largest window."""
        return self.slots + self.max_prefetch

    def resize(self, prefetch: int) -> None:
        """The Dispatcher's prefetch window changed (it follows the handlers' pace)."""
        self.prefetch = max(0, min(self.max_prefetch, prefetch))

    def next_claim(self, *, work_signalled: bool) -> int:
        """Return how many steps to claim now (0 for none) and reserve them.

        A claim waits for ``claim_batch`` free credits: with that many claimed steps still
        waiting for a slot, a bigger, later claim costs no handler time and saves
        transactions. Whenever a slot is idle, at least that many are free (nothing waits
        and every credit but the running ones is back), so waiting never starves the pool.

        A signal that cannot be served at once is remembered, never dropped: it is served
        when the claim on its way returns or when capacity frees.
        """
        if work_signalled:
            if self.claim_in_flight:
                self.signalled_during_claim = True
            else:
                self.backlog_likely = True
        free = self.available - (self.max_prefetch - self.prefetch)
        if (
            self.stopped
            or self.commits_lagging
            or self.claim_in_flight
            or free < claim_batch(self.prefetch)
            or not self.backlog_likely
        ):
            return 0
        self.claim_in_flight = True
        self.available -= free
        return free

    def claimed(self, requested: int, got: int) -> None:
        """Account for a finished claim: unclaimed credits come back."""
        self.claim_in_flight = False
        self.available += requested - got
        self.backlog_likely = got >= requested or self.signalled_during_claim
        self.signalled_during_claim = False

    def claimed_eagerly(self, steps: int) -> None:
        """Account for steps claimed by a commit (not by this intake): they hold credits too."""
        self.available -= steps

    def freed(self, slots: int = 1) -> None:
        """Account for capacity given back by the dispatcher."""
        self.available += slots
        if self.available > self.capacity:
            # Never claim past the capacity, but let the error show (``excess``).
            self.excess += self.available - self.capacity
            self.available = self.capacity

    def stop(self) -> None:
        self.stopped = True
