"""PrefetchWindow: claimed steps waiting for a slot follow the handlers' pace."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from duplex.intake.prefetch import HORIZON_S, PrefetchWindow, claim_batch

durations = st.floats(min_value=0.0, max_value=3600.0, allow_nan=False)


def test_before_any_attempt_ends_the_window_is_a_step_per_slot() -> None:
    assert PrefetchWindow(10, 200).size == 10
    assert PrefetchWindow(10, 4).size == 4
    assert PrefetchWindow(10, 0).size == 0


def test_fast_handlers_get_the_ceiling_and_slow_ones_a_step() -> None:
    fast = PrefetchWindow(10, 200)
    fast.observe(0.0002)
    assert fast.size == 200
    tenth = PrefetchWindow(10, 200)
    tenth.observe(0.1)  # 10 slots end 100 attempts a second: 10 of them in the horizon
    assert tenth.size == round(10 / 0.1 * HORIZON_S)
    slow = PrefetchWindow(10, 200)
    slow.observe(30.0)
    assert slow.size == 1
    none = PrefetchWindow(10, 0)
    none.observe(0.0001)
    assert none.size == 0


def test_the_mean_moves_towards_new_durations_gradually() -> None:
    window = PrefetchWindow(10, 200)
    window.observe(0.001)
    window.observe(0.011)  # one slower attempt moves the mean a tenth of the way
    assert window.mean_s == pytest.approx(0.002)
    assert window.size == 200  # 10 slots at 2 ms: 500 attempts in the horizon
    for _ in range(100):
        window.observe(0.05)
    assert window.size == 20


@given(
    slots=st.integers(1, 64),
    ceiling=st.integers(0, 1024),
    history=st.lists(durations, min_size=1, max_size=50),
)
def test_the_window_stays_between_one_and_the_ceiling(
    slots: int, ceiling: int, history: list[float]
) -> None:
    window = PrefetchWindow(slots, ceiling)
    for held_s in history:
        window.observe(held_s)
        assert min(ceiling, 1) <= window.size <= ceiling
        # A claim waits for no more than half the window, and never for nothing.
        assert 1 <= claim_batch(window.size) <= max(1, window.size)


@given(
    slots=st.integers(1, 64),
    ceiling=st.integers(0, 1024),
    fast=durations,
    slow=durations,
)
def test_slower_handlers_never_get_a_bigger_window(
    slots: int, ceiling: int, fast: float, slow: float
) -> None:
    fast, slow = min(fast, slow), max(fast, slow)
    quick, sluggish = PrefetchWindow(slots, ceiling), PrefetchWindow(slots, ceiling)
    quick.observe(fast)
    sluggish.observe(slow)
    assert sluggish.size <= quick.size


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="slots"):
        PrefetchWindow(0, 10)
    with pytest.raises(ValueError, match="ceiling"):
        PrefetchWindow(1, -1)
