"""``duplex.durations``: the one way durations are written (``500ms``, ``2s``, ``15m``, ``1h``,
``1d``), and every other text refused with one line."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from duplex.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", timedelta(milliseconds=500)),
        ("2s", timedelta(seconds=2)),
        ("15m", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("1d", timedelta(days=1)),
        (" 90m ", timedelta(minutes=90)),
        ("3650d", timedelta(days=3650)),
    ],
)
def test_durations_as_written(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("15", "not a duration"),
        ("m", "not a duration"),
        ("1h30m", "not a duration"),
        ("-5s", "not a duration"),
        ("5 s", "not a duration"),
        ("1w", "not a duration"),
        ("", "not a duration"),
        ("inf s", "not a duration"),
        ("1.5h", "not a duration"),
        ("1S", "not a duration"),
        ("10us", "not a duration"),
        ("3651d", "over the limit"),
        ("0s", "longer than zero"),
    ],
)
def test_anything_else_is_refused_with_one_line(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as refused:
        parse_duration(text)
    assert "\n" not in str(refused.value)


def test_zero_only_when_allowed() -> None:
    assert parse_duration("0ms", allow_zero=True) == timedelta(0)


def test_a_non_string_is_refused() -> None:
    with pytest.raises(ValueError, match="is a string"):
        parse_duration(15)  # type: ignore[arg-type]


@given(st.integers(min_value=1, max_value=3650 * 86_400_000))
def test_format_is_the_inverse_of_parse(ms: int) -> None:
    value = timedelta(milliseconds=ms)
    assert parse_duration(format_duration(value)) == value
