"""The Dispatcher's side of the credits: how fast slots free up, and when to say so.

Plain state, no threads: the Dispatcher actor owns one ``SlotCredits`` and sends what it
decides to the intake (``capacity_freed``).

* Pace: how long each attempt held its slot feeds the ``PrefetchWindow``, whose size goes
  back to the intake with the credits.
* Batching: while claimed steps still wait for a slot, freed credits go back in batches of
  at least ``claim_batch`` of the window (the intake claims no fewer anyway, so a message per
  credit would only wake it). With nothing waiting, or when a slot was lost to a timeout or
  a failure, every credit goes back at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from duplex.intake.prefetch import PrefetchWindow, claim_batch


@dataclass
class SlotCredits:
    """Credits of freed slots not yet handed back, and when each busy slot was assigned."""

    window: PrefetchWindow
    unreported: int = 0
    # When each busy worker was handed its attempt (monotonic seconds), for the window's pace.
    assigned_at: dict[int, float] = field(default_factory=dict)

    @classmethod
    def for_pool(cls, slots: int, prefetch: int) -> SlotCredits:
        return cls(PrefetchWindow(slots, prefetch))

    def assigned(self, worker_id: int, now: float) -> None:
        """Worker ``worker_id`` was handed an attempt at ``now``."""
        self.assigned_at[worker_id] = now

    def ended(self, worker_id: int, now: float) -> float:
        """Worker ``worker_id``'s attempt ended (or was abandoned) at ``now``.

        Returns how long it held the slot (0.0 when it was never assigned), and lets that
        pace size the window.
        """
        assigned_at = self.assigned_at.pop(worker_id, None)
        if assigned_at is None:
            return 0.0
        held_s = now - assigned_at
        self.window.observe(held_s)
        return held_s

    def freed(self, *, batched: bool, waiting: bool) -> int:
        """A slot's credit is free: return how many credits to hand back now (0: hold them).

        ``batched``: the slot freed because its attempt finished (not lost to a timeout or a
        failure); ``waiting``: claimed steps still wait for a slot.
        """
        self.unreported += 1
        if batched and waiting and self.unreported < claim_batch(self.window.size):
            return 0
        credits, self.unreported = self.unreported, 0
        return credits
