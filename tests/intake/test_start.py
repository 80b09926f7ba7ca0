"""``duplex.intake.start``: the checks of ``run_at``, ``delay`` and ``priority`` that
``Client.submit`` and ``duplex submit`` share; each refusal is one line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from duplex.errors import InputError
from duplex.intake.start import checked_priority, start_time

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def test_a_start_ahead_is_kept_in_any_zone() -> None:
    berlin = timezone(timedelta(hours=1))
    at = datetime(2026, 12, 24, 8, 0, tzinfo=berlin)
    assert start_time(at, None, now=NOW) == datetime(2026, 12, 24, 7, 0, tzinfo=UTC)
    assert start_time(None, timedelta(minutes=15), now=NOW) == NOW + timedelta(minutes=15)


@pytest.mark.parametrize(
    ("run_at", "delay"),
    [(None, None), (NOW, None), (NOW - timedelta(days=3), None), (None, timedelta(0))],
)
def test_now_or_a_past_time_means_now(run_at: datetime | None, delay: timedelta | None) -> None:
    assert start_time(run_at, delay, now=NOW) is None


@pytest.mark.parametrize(
    ("run_at", "delay", "problem"),
    [
        (datetime(2026, 12, 24, 8, 0), None, "has no time zone"),
        (NOW + timedelta(hours=1), timedelta(minutes=1), "not both"),
        (None, timedelta(seconds=-1), "must not be negative"),
        (None, timedelta(days=4000), "too long"),
        (NOW + timedelta(days=4000), None, "too far ahead"),
        ("2026-12-24T08:00:00Z", None, "must be a datetime"),
        (None, 30, "must be a timedelta"),
    ],
)
def test_bad_starts_are_refused_with_one_line(run_at: Any, delay: Any, problem: str) -> None:
    with pytest.raises(InputError, match=problem) as refused:
        start_time(run_at, delay, now=NOW)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("value", [None, -100, 0, 100])
def test_priorities_in_range_pass(value: int | None) -> None:
    assert checked_priority(value) == value


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (101, "out of range"),
        (-101, "out of range"),
        (True, "integer"),
        (1.5, "integer"),
        ("3", "integer"),
    ],
)
def test_other_priorities_are_refused(value: Any, problem: str) -> None:
    with pytest.raises(InputError, match=problem):
        checked_priority(value)
