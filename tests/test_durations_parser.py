"""duplex.durations: ``500ms``, ``2s``, ``15m``, ``1h``, ``1d`` and nothing else."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from duplex.durations import MAX_DURATION, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", timedelta(milliseconds=500)),
        ("2s", timedelta(seconds=2)),
        ("15m", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("1d", timedelta(days=1)),
        (" 3m ", timedelta(minutes=3)),
        ("3650d", MAX_DURATION),
    ],
)
def test_each_unit(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "15", "m", "1.5h", "1h30m", "-1s", "1 s", "1S", "1w", "10us", "0x1s"]
)
def test_anything_else_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration") as info:
        parse_duration(text)
    assert "\n" not in str(info.value)


def test_zero_too_long_and_non_strings_are_refused() -> None:
    with pytest.raises(ValueError, match="longer than zero"):
        parse_duration("0ms")
    with pytest.raises(ValueError, match="over the limit"):
        parse_duration("3651d")
    with pytest.raises(ValueError, match="is a string"):
        parse_duration(15)  # type: ignore[arg-type]


@given(st.integers(min_value=1, max_value=int(MAX_DURATION / timedelta(milliseconds=1))))
def test_format_is_the_inverse_of_parse(ms: int) -> None:
    value = timedelta(milliseconds=ms)
    assert parse_duration(format_duration(value)) == value
