"""The prefetch window: how many claimed steps may wait for a handler slot.

A claim is a write transaction, and a pool that runs out of claimed steps puts its handler
threads to sleep, to be woken for the next claim; with short handlers both cost more than
the handlers do. Claimed steps waiting for a slot cost the queue something too: no other
worker can run them, and a claimed step waits longer the slower the handlers are.

So the window follows the handlers' pace: it holds what the pool gets through in about
``HORIZON_S``, at most ``worker.prefetch`` steps. No-op handlers get the whole ceiling (big,
rare claims); 100 ms handlers on 10 slots get 10; one-second handlers get 1. Plain state, no
threads: the Dispatcher owns one and reports its size with the credits it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

# How much of the pool's work a worker holds claimed ahead of its slots. Long enough that a
# claim of half the window is not a transaction per step; short enough that a step claimed
# here never waits long while another worker's slots are free.
HORIZON_S = 0.1
# Weight of the newest attempt in the running mean of how long a slot is held.
SMOOTHING = 0.1
# Below this a handler's duration is measured noise; it keeps the arithmetic finite.
SHORTEST_S = 1e-6


def claim_batch(prefetch: int) -> int:
    """How many free credits a claim waits for: half the window, so that while that many
    claimed steps still wait for a slot, the next, bigger claim leaves no handler idle."""
    return max(1, prefetch // 2)


@dataclass
class PrefetchWindow:
    """The window's size now, from a running mean of how long each attempt held its slot."""

    slots: int
    ceiling: int
    mean_s: float | None = None  # unknown until the first attempt ends

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError("slots must be >= 1")
        if self.ceiling < 0:
            raise ValueError("ceiling must be >= 0")

    def observe(self, held_s: float) -> None:
        """An attempt held its slot for ``held_s`` seconds."""
        held_s = max(held_s, SHORTEST_S)
        if self.mean_s is None:
            self.mean_s = held_s
        else:
            self.mean_s += SMOOTHING * (held_s - self.mean_s)

    @property
    def size(self) -> int:
        """Claimed steps that may wait for a slot now: 0 to ``ceiling``.

        Before any attempt has ended the pace is unknown: one step per slot, a guess that is
        neither a hoard for slow handlers nor a transaction per step for fast ones.
        """
        if self.mean_s is None:
            return min(self.ceiling, self.slots)
        pace = self.slots / self.mean_s  # attempts the pool ends per second
        return max(min(self.ceiling, 1), min(self.ceiling, int(pace * HORIZON_S)))
