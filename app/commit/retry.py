"""The retry policy: what a failed attempt leads to, and when the next attempt is due."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from duplex.errors import MAX_RETRY_AFTER_S
from duplex.messages import StepFailure
from duplex.settings import RetrySettings
from duplex.states import ERROR, WAITING_FOR_RETRY


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """The state a failed attempt moves its step to, and when a retry is due."""

    state: str
    next_attempt_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with jitter: ``base * multiplier ** (attempt - 1)``."""

    base_ms: int = 1000
    multiplier: float = 2.0
    max_ms: int = 300_000
    jitter: float = 0.1

    @classmethod
    def from_settings(cls, settings: RetrySettings) -> RetryPolicy:
        return cls(
            settings.backoff_base_ms,
            settings.backoff_multiplier,
            settings.backoff_max_ms,
            settings.jitter,
        )

    def delay(self, attempt: int, rng: random.Random) -> timedelta:
        """Return the wait before the attempt after ``attempt`` (1-based)."""
        exponent = max(0, attempt - 1)
        try:
            growth = float(self.multiplier) ** exponent
        except OverflowError:  # a huge multiplier or attempt number: the cap applies
            growth = math.inf
        raw = min(float(self.max_ms), self.base_ms * growth) if self.base_ms else 0.0
        jittered = raw * (1 + rng.uniform(-self.jitter, self.jitter))
        return timedelta(milliseconds=max(0.0, min(jittered, float(self.max_ms))))

    def decide(
        self,
        failure: StepFailure,
        *,
        attempt: int,
        max_attempts: int,
        step_retryable: bool,
        now: datetime,
        rng: random.Random,
    ) -> RetryDecision:
        """Decide between another attempt later and a permanent ``error``."""
        if not (failure.retryable and step_retryable and attempt < max_attempts):
            return RetryDecision(ERROR)
        retry_after = failure.retry_after
        if retry_after is not None and math.isfinite(retry_after):
            wait = timedelta(seconds=min(max(0.0, retry_after), MAX_RETRY_AFTER_S))
        else:
            wait = self.delay(attempt, rng)
        return RetryDecision(WAITING_FOR_RETRY, now + wait)
