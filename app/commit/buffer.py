"""The CompletionProcessor's buffer: results waiting for a commit, and when to commit them.

Plain state, no threads (like ``HandlerPool`` and ``IntakeCredits``): the actor owns one
``CommitBuffer`` and turns its decisions into messages and timers.

* Batching: a commit takes at most ``batch_size`` results (and every pending release).
* Group commit: a result that comes alone (an idle worker, a chain of steps) commits at
  once; results that arrive while a commit is on its way gather into the next batch.
* Linger, only under load: after a batch of several results (a stream), the next batch may
  wait up to ``linger_s`` to gather as many as the last one held, since one transaction for
  several results costs far less than one each; it commits as soon as it has them. The
  linger is an upper bound while results stream in, never a toll on a lone result.
* Backoff: after failed commits in a row, the next try waits 50 ms, doubling, at most 5 s.
* Lag: once ``batch_size`` results wait, intake should pause; it resumes at half that.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from duplex.messages import ClaimedStep, StepOutcome

RETRY_FIRST_S = 0.05
RETRY_MAX_S = 5.0


@dataclass
class CommitBuffer:
    """Results and releases waiting for the database."""

    batch_size: int
    linger_s: float = 0.0
    outcomes: list[StepOutcome] = field(default_factory=list)
    releases: list[ClaimedStep] = field(default_factory=list)
    failures_in_a_row: int = 0
    lagging: bool = False
    flush_scheduled: bool = False
    # The scheduled commit lingers for ``gather_target`` results (see ``gathered``).
    lingering: bool = False
    # Numbers the scheduled commits, so a timer that fires after its batch went (committed
    # early, when it gathered enough) is told apart from the one scheduled now.
    round: int = 0
    # How many results the last batch committed: 1 (or 0) when they come alone.
    last_batch: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    def add(self, outcome: StepOutcome) -> bool:
        """Buffer a result; return True when the buffer just started to lag."""
        self.outcomes.append(outcome)
        if not self.lagging and len(self.outcomes) >= self.batch_size:
            self.lagging = True
            return True
        return False

    def add_releases(self, steps: Iterable[ClaimedStep]) -> None:
        self.releases.extend(steps)

    def next_batch(self) -> tuple[list[StepOutcome], list[ClaimedStep]]:
        """What the next commit takes (left in the buffer until ``committed``)."""
        return self.outcomes[: self.batch_size], list(self.releases)

    def committed(self, outcomes: int, *, releases: bool) -> bool:
        """Drop what was committed; return True when a lag just ended."""
        self.failures_in_a_row = 0
        self.last_batch = outcomes
        del self.outcomes[:outcomes]
        if releases:
            self.releases.clear()
        if self.lagging and len(self.outcomes) <= self.batch_size // 2:
            self.lagging = False
            return True
        return False

    def failed(self) -> float:
        """Count a failed commit; return how long to wait before the next try."""
        self.failures_in_a_row += 1
        return self.retry_delay()

    def retry_delay(self) -> float:
        exponent = min(max(self.failures_in_a_row - 1, 0), 10)
        return min(RETRY_MAX_S, RETRY_FIRST_S * 2.0**exponent)

    def schedule(self) -> float | None:
        """Return in how many seconds to commit (0: now), or None if a commit is scheduled.

        The commit scheduled is ``round``; ``due(round)`` tells whether it is still the one.
        """
        if self.flush_scheduled or not self:
            return None
        self.flush_scheduled = True
        self.round += 1
        self.lingering = bool(self.linger_s) and len(self.outcomes) < self.gather_target
        return self.linger_s if self.lingering else 0.0

    def schedule_retry(self) -> int:
        """A commit failed: schedule the next try (in ``retry_delay()``); return its round."""
        self.flush_scheduled = True
        self.lingering = False
        self.round += 1
        return self.round

    @property
    def gather_target(self) -> int:
        """How many results a lingering batch waits for: as many as the last batch held."""
        return min(self.batch_size, max(1, self.last_batch))

    def gathered(self) -> bool:
        """Return True once when a lingering batch has gathered its target: commit it now."""
        if self.lingering and len(self.outcomes) >= self.gather_target:
            self.lingering = False
            return True
        return False

    def due(self, round: int) -> bool:
        """Whether the commit scheduled as ``round`` is still to be made; taking it clears
        the schedule (a late timer of a batch committed early finds it gone)."""
        if not self.flush_scheduled or round != self.round:
            return False
        self.flush_scheduled = False
        self.lingering = False
        return True

    @property
    def held(self) -> int:
        return len(self.outcomes) + len(self.releases)

    @property
    def failing(self) -> bool:
        return self.failures_in_a_row > 0

    def __bool__(self) -> bool:
        return bool(self.outcomes or self.releases)
