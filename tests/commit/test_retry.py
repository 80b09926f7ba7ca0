"""RetryPolicy: capped exponential backoff with jitter, retry_after, and when to give up."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from duplex.commit.retry import RetryPolicy
from duplex.messages import StepFailure
from duplex.settings import RetrySettings
from duplex.states import ERROR, WAITING_FOR_RETRY

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
# timedelta keeps microseconds; allow for rounding to them.
TOLERANCE_MS = 0.002


class FixedUniform(random.Random):
    """An rng whose ``uniform`` always picks the low or the high end."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def ms(delta: timedelta) -> float:
    return delta / timedelta(milliseconds=1)


def retryable(retry_after: float | None = None) -> StepFailure:
    return StepFailure("handler_error", "boom", retryable=True, retry_after=retry_after)


def test_delay_grows_exponentially_without_jitter() -> None:
    policy = RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=1_000_000, jitter=0.0)
    rng = random.Random(1)
    assert [ms(policy.delay(a, rng)) for a in range(1, 6)] == [1000, 2000, 4000, 8000, 16000]


def test_delay_with_another_multiplier() -> None:
    policy = RetryPolicy(base_ms=100, multiplier=3.0, max_ms=1_000_000, jitter=0.0)
    rng = random.Random(1)
    assert [ms(policy.delay(a, rng)) for a in range(1, 5)] == [100, 300, 900, 2700]


def test_delay_is_capped() -> None:
    policy = RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=5000, jitter=0.0)
    rng = random.Random(1)
    assert [ms(policy.delay(a, rng)) for a in (3, 4, 5, 50, 100)] == [4000, 5000] + [5000] * 3


def test_delay_for_attempt_zero_or_below_is_the_base() -> None:
    policy = RetryPolicy(base_ms=250, multiplier=2.0, max_ms=10_000, jitter=0.0)
    assert ms(policy.delay(0, random.Random(1))) == 250
    assert ms(policy.delay(-3, random.Random(1))) == 250


def test_delay_for_a_huge_attempt_is_the_cap() -> None:
    policy = RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=60_000, jitter=0.0)
    assert ms(policy.delay(10_000, random.Random(1))) == 60_000


def test_delay_with_a_large_multiplier_is_the_cap() -> None:
    # Allowed by the settings (backoff_multiplier only has ge=1.0) and by templates
    # (max_attempts <= 100).
    policy = RetryPolicy(base_ms=1000, multiplier=10_000.0, max_ms=60_000, jitter=0.0)
    assert ms(policy.delay(100, random.Random(1))) == 60_000


@pytest.mark.parametrize(
    ("base_ms", "multiplier", "expected_ms"), [(500, 1.0, 500), (0, 2.0, 0)], ids=["flat", "zero"]
)
def test_delay_after_1024_attempts_still_follows_base_and_multiplier(
    base_ms: int, multiplier: float, expected_ms: int
) -> None:
    policy = RetryPolicy(base_ms=base_ms, multiplier=multiplier, max_ms=60_000, jitter=0.0)
    assert ms(policy.delay(2000, random.Random(1))) == expected_ms


def test_jitter_reaches_both_ends_of_its_range() -> None:
    policy = RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=1_000_000, jitter=0.25)
    assert ms(policy.delay(2, FixedUniform(high=False))) == pytest.approx(1500)
    assert ms(policy.delay(2, FixedUniform(high=True))) == pytest.approx(2500)


def test_jitter_never_exceeds_the_cap() -> None:
    policy = RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=1000, jitter=0.5)
    assert ms(policy.delay(1, FixedUniform(high=True))) == 1000
    assert ms(policy.delay(1, FixedUniform(high=False))) == 500


def test_jitter_varies_the_delay() -> None:
    policy = RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=1_000_000, jitter=0.5)
    rng = random.Random(42)
    assert len({policy.delay(3, rng) for _ in range(20)}) > 1


@given(
    attempt=st.integers(min_value=1, max_value=1024),
    base_ms=st.integers(min_value=0, max_value=10_000_000),
    multiplier=st.floats(min_value=1.0, max_value=10.0),
    max_ms=st.integers(min_value=0, max_value=10_000_000),
    jitter=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_delay_stays_within_jitter_bounds_of_the_capped_exponential(
    attempt: int, base_ms: int, multiplier: float, max_ms: int, jitter: float, seed: int
) -> None:
    policy = RetryPolicy(base_ms=base_ms, multiplier=multiplier, max_ms=max_ms, jitter=jitter)
    if (attempt - 1) * _log10(multiplier) > 300:
        attempt = 1 + int(300 / _log10(multiplier))
    raw = min(float(max_ms), base_ms * multiplier ** (attempt - 1))
    low = raw * (1 - jitter)
    high = min(raw * (1 + jitter), float(max_ms))
    delay = ms(policy.delay(attempt, random.Random(seed)))
    assert 0 <= delay <= max_ms + TOLERANCE_MS
    assert low - TOLERANCE_MS <= delay <= high + TOLERANCE_MS


@given(
    attempt=st.integers(min_value=1, max_value=60),
    base_ms=st.integers(min_value=1, max_value=100_000),
    multiplier=st.floats(min_value=1.0, max_value=4.0),
)
def test_delay_without_jitter_never_shrinks_as_attempts_grow(
    attempt: int, base_ms: int, multiplier: float
) -> None:
    policy = RetryPolicy(base_ms=base_ms, multiplier=multiplier, max_ms=3_600_000, jitter=0.0)
    rng = random.Random(0)
    assert policy.delay(attempt, rng) <= policy.delay(attempt + 1, rng)


def _log10(x: float) -> float:
    return math.log10(x) if x > 1 else 1e-9


# --- decide ------------------------------------------------------------------------------------


def test_retryable_failure_with_attempts_left_waits() -> None:
    policy = RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=60_000, jitter=0.0)
    decision = policy.decide(
        retryable(),
        attempt=2,
        max_attempts=3,
        step_retryable=True,
        now=NOW,
        rng=random.Random(1),
    )
    assert decision.state == WAITING_FOR_RETRY == "waiting_for_retry"
    assert decision.next_attempt_at == NOW + timedelta(seconds=2)


@given(seed=st.integers(min_value=0, max_value=2**32), jitter=st.floats(0.0, 1.0))
def test_retry_is_due_within_the_jittered_window(seed: int, jitter: float) -> None:
    policy = RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=60_000, jitter=jitter)
    decision = policy.decide(
        retryable(),
        attempt=3,
        max_attempts=5,
        step_retryable=True,
        now=NOW,
        rng=random.Random(seed),
    )
    assert decision.state == WAITING_FOR_RETRY
    assert decision.next_attempt_at is not None
    wait = ms(decision.next_attempt_at - NOW)
    assert 4000 * (1 - jitter) - TOLERANCE_MS <= wait <= 4000 * (1 + jitter) + TOLERANCE_MS


@pytest.mark.parametrize("retry_after", [0.0, 0.5, 7.0, 3600.0])
def test_retry_after_overrides_the_backoff(retry_after: float) -> None:
    # Even beyond backoff_max_ms: the handler knows when the resource comes back.
    policy = RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=2000, jitter=0.5)
    decision = policy.decide(
        retryable(retry_after),
        attempt=1,
        max_attempts=3,
        step_retryable=True,
        now=NOW,
        rng=random.Random(1),
    )
    assert decision.state == WAITING_FOR_RETRY
    assert decision.next_attempt_at == NOW + timedelta(seconds=retry_after)


def test_non_retryable_failure_is_an_error() -> None:
    decision = RetryPolicy().decide(
        StepFailure("permanent_error", "no", retryable=False),
        attempt=1,
        max_attempts=5,
        step_retryable=True,
        now=NOW,
        rng=random.Random(1),
    )
    assert decision.state == ERROR == "error"
    assert decision.next_attempt_at is None


def test_non_retryable_step_is_an_error() -> None:
    decision = RetryPolicy().decide(
        retryable(retry_after=1.0),
        attempt=1,
        max_attempts=5,
        step_retryable=False,
        now=NOW,
        rng=random.Random(1),
    )
    assert decision.state == ERROR
    assert decision.next_attempt_at is None


@pytest.mark.parametrize(("attempt", "max_attempts"), [(3, 3), (1, 1), (4, 3)])
def test_exhausted_attempts_are_an_error(attempt: int, max_attempts: int) -> None:
    decision = RetryPolicy().decide(
        retryable(retry_after=1.0),
        attempt=attempt,
        max_attempts=max_attempts,
        step_retryable=True,
        now=NOW,
        rng=random.Random(1),
    )
    assert decision.state == ERROR
    assert decision.next_attempt_at is None


@given(
    attempt=st.integers(min_value=1, max_value=20),
    max_attempts=st.integers(min_value=1, max_value=20),
    failure_retryable=st.booleans(),
    step_retryable=st.booleans(),
)
def test_decide_retries_exactly_when_everything_allows_it(
    attempt: int, max_attempts: int, failure_retryable: bool, step_retryable: bool
) -> None:
    decision = RetryPolicy().decide(
        StepFailure("x", "y", retryable=failure_retryable),
        attempt=attempt,
        max_attempts=max_attempts,
        step_retryable=step_retryable,
        now=NOW,
        rng=random.Random(attempt),
    )
    should_retry = failure_retryable and step_retryable and attempt < max_attempts
    assert decision.state == (WAITING_FOR_RETRY if should_retry else ERROR)
    assert (decision.next_attempt_at is not None) == should_retry
    if decision.next_attempt_at is not None:
        assert decision.next_attempt_at >= NOW


def test_from_settings_maps_every_field() -> None:
    settings = RetrySettings(
        backoff_base_ms=10, backoff_multiplier=3.0, backoff_max_ms=999, jitter=0.2
    )
    assert RetryPolicy.from_settings(settings) == RetryPolicy(
        base_ms=10, multiplier=3.0, max_ms=999, jitter=0.2
    )
