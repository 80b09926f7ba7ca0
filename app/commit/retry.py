"""The retry policy: what a failed attempt leads to, and when the next attempt is due.

The one place a backoff is computed. The worker's ``[retry]`` settings give the default
policy; a step may override any of its fields with ``[steps.retry]`` in its template, stored
with the step (``workflow_steps.retry_policy``) and carried by its claim
(``ClaimedStep.retry_policy``), so the commit that fails an attempt applies the step's own
policy, whichever worker commits it (``RetryPolicy.for_step``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from duplex.errors import CANCELLED as CANCELLED_ERROR
from duplex.errors import MAX_RETRY_AFTER_S
from duplex.messages import RetryOverride, StepFailure
from duplex.settings import RetrySettings
from duplex.states import CANCELLED, ERROR, WAITING_FOR_RETRY

Strategy = Literal["exponential", "linear", "fixed"]
STRATEGIES: tuple[Strategy, ...] = ("exponential", "linear", "fixed")


# A delay in a retry policy: at most 30 days, the furthest the timer serves.
_DelayMs = Annotated[int, Field(strict=True, ge=0, le=2_592_000_000)]


class StepRetryPolicy(BaseModel):
    """A step's ``[steps.retry]`` in its template (``duplex.templates``): the fields of the
    worker's ``[retry]`` it overrides. Stored with the step (``workflow_steps.retry_policy``),
    applied by ``RetryPolicy.for_step``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["exponential", "linear", "fixed"] | None = None
    base_ms: _DelayMs | None = None
    # An int is a float here (``multiplier = 2``); below 1 the delays would shrink.
    multiplier: Annotated[float, Field(ge=1.0, le=1000.0, allow_inf_nan=False)] | None = None
    max_ms: _DelayMs | None = None
    jitter: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None

    @field_validator("multiplier", "jitter", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        """Refuse strings and booleans, which pydantic would otherwise turn into numbers."""
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError("Input should be a number")
        return value

    def stored(self) -> dict[str, Any] | None:
        """The JSON stored with the step: only the fields set (None when none is)."""
        return self.model_dump(exclude_none=True) or None


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """The state a failed attempt moves its step to, and when a retry is due."""

    state: str
    next_attempt_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped backoff with jitter. The delay before the attempt after attempt ``n``:

    * ``exponential``: ``base * multiplier ** (n - 1)``
    * ``linear``: ``base * (1 + multiplier * (n - 1))`` (multiplier 1: base, 2 base, 3 base)
    * ``fixed``: ``base``

    each capped at ``max_ms``, then moved by up to ``± jitter`` of itself, never above
    ``max_ms`` nor below zero.
    """

    base_ms: int = 1000
    multiplier: float = 2.0
    max_ms: int = 300_000
    jitter: float = 0.1
    strategy: Strategy = "exponential"

    @classmethod
    def from_settings(cls, settings: RetrySettings) -> RetryPolicy:
        return cls(
            settings.backoff_base_ms,
            settings.backoff_multiplier,
            settings.backoff_max_ms,
            settings.jitter,
            settings.strategy,
        )

    def for_step(self, override: RetryOverride | None) -> RetryPolicy:
        """Return this policy with the fields a step's ``[steps.retry]`` sets replaced."""
        if override is None:
            return self
        changes = {
            name: value
            for name in ("strategy", "base_ms", "multiplier", "max_ms", "jitter")
            if (value := getattr(override, name)) is not None
        }
        return dataclasses.replace(self, **changes) if changes else self

    def raw_delay_ms(self, attempt: int) -> float:
        """Return the capped delay after ``attempt`` (1-based) before jitter, in ms."""
        if not self.base_ms:
            return 0.0
        steps = max(0, attempt - 1)
        if self.strategy == "fixed":
            growth = 1.0
        elif self.strategy == "linear":
            growth = 1.0 + float(self.multiplier) * steps
        else:
            try:
                growth = float(self.multiplier) ** steps
            except OverflowError:  # a huge multiplier or attempt number: the cap applies
                growth = math.inf
        return min(float(self.max_ms), self.base_ms * growth)

    def delay(self, attempt: int, rng: random.Random) -> timedelta:
        """Return the wait before the attempt after ``attempt`` (1-based)."""
        raw = self.raw_delay_ms(attempt)
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
        """Decide between another attempt later and a permanent ``error``; an attempt an
        operator cancelled (``error_type = cancelled``) ends the step ``cancelled``."""
        if failure.error_type == CANCELLED_ERROR:
            # Not a failure of the step: it was stopped on purpose, and says so in its state.
            return RetryDecision(CANCELLED)
        if not (failure.retryable and step_retryable and attempt < max_attempts):
            return RetryDecision(ERROR)
        retry_after = failure.retry_after
        if retry_after is not None and math.isfinite(retry_after):
            wait = timedelta(seconds=min(max(0.0, retry_after), MAX_RETRY_AFTER_S))
        else:
            wait = self.delay(attempt, rng)
        return RetryDecision(WAITING_FOR_RETRY, now + wait)
