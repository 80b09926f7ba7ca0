"""RetryPolicy strategies (exponential, linear, fixed) and a step's override of the policy."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duplex.commit.retry import STRATEGIES, RetryPolicy, Strategy
from duplex.messages import RetryOverride, StepFailure
from duplex.settings import RetrySettings

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
TOLERANCE_MS = 0.002  # timedelta keeps microseconds


def ms(delta: timedelta) -> float:
    return delta / timedelta(milliseconds=1)


class FixedUniform(random.Random):
    """An rng whose ``uniform`` always picks the low or the high end."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def delays(policy: RetryPolicy, attempts: range) -> list[float]:
    return [ms(policy.delay(a, random.Random(0))) for a in attempts]


def test_exponential_doubles() -> None:
    policy = RetryPolicy(base_ms=100, multiplier=2.0, max_ms=10_000, jitter=0.0)
    assert delays(policy, range(1, 6)) == [100, 200, 400, 800, 1600]


def test_linear_adds_base_times_multiplier_per_attempt() -> None:
    policy = RetryPolicy(base_ms=100, multiplier=1.0, max_ms=10_000, jitter=0.0, strategy="linear")
    assert delays(policy, range(1, 6)) == [100, 200, 300, 400, 500]
    policy = RetryPolicy(base_ms=100, multiplier=2.5, max_ms=10_000, jitter=0.0, strategy="linear")
    assert delays(policy, range(1, 5)) == [100, 350, 600, 850]


def test_fixed_ignores_the_multiplier() -> None:
    policy = RetryPolicy(base_ms=200, multiplier=7.0, max_ms=10_000, jitter=0.0, strategy="fixed")
    assert delays(policy, range(1, 6)) == [200] * 5


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_is_capped(strategy: Strategy) -> None:
    policy = RetryPolicy(base_ms=3000, multiplier=3.0, max_ms=2500, jitter=0.0, strategy=strategy)
    assert delays(policy, range(1, 4)) == [2500] * 3
    assert ms(policy.delay(10**9, random.Random(0))) == 2500


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_jitter_reaches_both_ends_and_never_the_cap_plus(strategy: Strategy) -> None:
    policy = RetryPolicy(base_ms=1000, multiplier=1.0, max_ms=1200, jitter=0.5, strategy=strategy)
    assert ms(policy.delay(1, FixedUniform(high=False))) == pytest.approx(500)
    assert ms(policy.delay(1, FixedUniform(high=True))) == pytest.approx(1200)  # capped


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_zero_base_never_waits(strategy: Strategy) -> None:
    policy = RetryPolicy(base_ms=0, multiplier=2.0, max_ms=1000, jitter=0.5, strategy=strategy)
    assert delays(policy, range(1, 5)) == [0, 0, 0, 0]


@settings(max_examples=500)
@given(
    strategy=st.sampled_from(STRATEGIES),
    attempt=st.integers(min_value=-5, max_value=100_000),
    base_ms=st.integers(min_value=0, max_value=2_592_000_000),
    multiplier=st.floats(min_value=1.0, max_value=1000.0),
    max_ms=st.integers(min_value=0, max_value=2_592_000_000),
    jitter=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_delay_is_within_zero_and_the_jittered_cap(
    strategy: Strategy,
    attempt: int,
    base_ms: int,
    multiplier: float,
    max_ms: int,
    jitter: float,
    seed: int,
) -> None:
    policy = RetryPolicy(base_ms, multiplier, max_ms, jitter, strategy)
    delay = ms(policy.delay(attempt, random.Random(seed)))
    assert 0 <= delay <= max_ms * (1 + jitter) + TOLERANCE_MS
    raw = policy.raw_delay_ms(attempt)
    assert (
        raw * (1 - jitter) - TOLERANCE_MS
        <= delay
        <= min(raw * (1 + jitter), max_ms) + (TOLERANCE_MS)
    )


@settings(max_examples=500)
@given(
    strategy=st.sampled_from(("exponential", "linear")),
    attempt=st.integers(min_value=1, max_value=10_000),
    base_ms=st.integers(min_value=0, max_value=2_592_000_000),
    multiplier=st.floats(min_value=1.0, max_value=1000.0),
    max_ms=st.integers(min_value=0, max_value=2_592_000_000),
)
def test_before_jitter_the_delay_never_shrinks_as_attempts_grow(
    strategy: Strategy, attempt: int, base_ms: int, multiplier: float, max_ms: int
) -> None:
    policy = RetryPolicy(base_ms, multiplier, max_ms, 0.0, strategy)
    assert policy.raw_delay_ms(attempt) <= policy.raw_delay_ms(attempt + 1)
    assert ms(policy.delay(attempt, random.Random(0))) <= ms(
        policy.delay(attempt + 1, random.Random(0))
    )


def test_a_step_override_replaces_only_the_fields_it_sets() -> None:
    worker = RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=60_000, jitter=0.1)
    step = worker.for_step(RetryOverride(strategy="fixed", base_ms=200))
    assert step == RetryPolicy(
        base_ms=200, multiplier=2.0, max_ms=60_000, jitter=0.1, strategy="fixed"
    )
    assert worker.for_step(None) is worker
    assert worker.for_step(RetryOverride()) is worker
    assert worker.for_step(RetryOverride(jitter=0.0)).jitter == 0.0  # zero is a value


def test_the_step_override_decides_when_the_retry_is_due() -> None:
    worker = RetryPolicy(base_ms=60_000, multiplier=2.0, max_ms=600_000, jitter=0.0)
    override = RetryOverride(strategy="linear", base_ms=100, multiplier=1.0, jitter=0.0)
    failure = StepFailure("handler_error", "boom", retryable=True)
    decision = worker.for_step(override).decide(
        failure, attempt=3, max_attempts=5, step_retryable=True, now=NOW, rng=random.Random(0)
    )
    assert decision.next_attempt_at == NOW + timedelta(milliseconds=300)


def test_stored_overrides_are_read_back_and_unknown_keys_ignored() -> None:
    assert RetryOverride.from_json(None) is None
    assert RetryOverride.from_json({}) is None
    assert RetryOverride.from_json({"strategy": "fixed", "base_ms": 5, "later": 1}) == (
        RetryOverride(strategy="fixed", base_ms=5)
    )


def test_the_strategy_setting_reaches_the_policy() -> None:
    settings_ = RetrySettings(strategy="linear")
    assert RetryPolicy.from_settings(settings_).strategy == "linear"
