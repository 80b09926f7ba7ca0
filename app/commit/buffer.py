"""The CompletionProcessor's buffer: results waiting for a commit, and when to commit them.

Plain state, no threads (like ``HandlerPool`` and ``IntakeCredits``): the actor owns one
``CommitBuffer`` and turns its decisions into messages and timers.

* Batching: a commit takes at most ``batch_size`` results (and every pending release).
* Linger: a batch that is not full may wait ``linger_s`` for more results, since one
  transaction for several results costs far less than one each; the slots are already free.
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
        """Return in how many seconds to commit (0: now), or None if a commit is scheduled."""
        if self.flush_scheduled or not self:
            return None
        self.flush_scheduled = True
        if self.linger_s and len(self.outcomes) < self.batch_size:
            return self.linger_s
        return 0.0

    @property
    def held(self) -> int:
        return len(self.outcomes) + len(self.releases)

    @property
    def failing(self) -> bool:
        return self.failures_in_a_row > 0

    def __bool__(self) -> bool:
        return bool(self.outcomes or self.releases)
