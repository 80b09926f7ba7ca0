"""Fire times of cron and interval schedules, across DST changes and time zones."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duplex.errors import InputError
from duplex.schedules.spec import ScheduleSpec, format_duration, parse_duration

BERLIN = ZoneInfo("Europe/Berlin")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def fires(spec: ScheduleSpec, after: datetime, n: int) -> list[datetime]:
    found = []
    for moment in spec.fires_after(after):
        found.append(moment)
        if len(found) == n:
            return found
    raise AssertionError("unreachable")


def test_daily_0230_berlin_on_the_spring_forward_day_fires_once_at_0300() -> None:
    # 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that night.
    spec = ScheduleSpec(cron="30 2 * * *", timezone="Europe/Berlin")
    got = fires(spec, datetime(2026, 3, 28, 12, tzinfo=BERLIN), 3)
    local = [moment.astimezone(BERLIN) for moment in got]
    assert [m.strftime("%m-%d %H:%M %Z") for m in local] == [
        "03-29 03:00 CEST",
        "03-30 02:30 CEST",
        "03-31 02:30 CEST",
    ]
    assert got[0] == utc(2026, 3, 29, 1, 0)
    assert got[1] - got[0] == timedelta(hours=23, minutes=30)


def test_daily_0230_berlin_on_the_fall_back_day_fires_once_at_the_first_0230() -> None:
    # 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
    spec = ScheduleSpec(cron="30 2 * * *", timezone="Europe/Berlin")
    got = fires(spec, datetime(2026, 10, 24, 12, tzinfo=BERLIN), 3)
    assert got == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30), utc(2026, 10, 27, 1, 30)]
    # Started between the two 02:30s (in the repeated hour), it does not fire the second one.
    assert spec.next_after(utc(2026, 10, 25, 0, 45)) == utc(2026, 10, 26, 1, 30)
    assert spec.next_after(utc(2026, 10, 25, 1, 15)) == utc(2026, 10, 26, 1, 30)


def test_an_every_half_hour_cron_fires_in_both_repeated_hours() -> None:
    spec = ScheduleSpec(cron="*/30 * * * *", timezone="Europe/Berlin")
    got = fires(spec, utc(2026, 10, 24, 23, 10), 5)
    # 01:30 CEST, 02:00 CEST, 02:30 CEST, 02:00 CET, 02:30 CET: every real half hour.
    assert got == [utc(2026, 10, 24, 23, 30) + timedelta(minutes=30 * i) for i in range(5)]


def test_cron_is_read_in_the_schedule_zone() -> None:
    tokyo = ScheduleSpec(cron="0 9 * * *", timezone="Asia/Tokyo")
    new_york = ScheduleSpec(cron="0 9 * * *", timezone="America/New_York")
    assert tokyo.next_after(utc(2026, 6, 30, 23)) == utc(2026, 7, 1, 0)
    assert new_york.next_after(utc(2026, 7, 1)) == utc(2026, 7, 1, 13)  # EDT
    assert new_york.next_after(utc(2026, 12, 1)) == utc(2026, 12, 1, 14)  # EST
    assert ScheduleSpec(cron="0 9 * * *").next_after(utc(2026, 7, 1)) == utc(2026, 7, 1, 9)


def test_a_fire_time_is_strictly_after_the_instant_given() -> None:
    spec = ScheduleSpec(cron="0 * * * *")
    assert spec.next_after(utc(2026, 1, 1, 3)) == utc(2026, 1, 1, 4)
    assert spec.next_after(utc(2026, 1, 1, 3) - timedelta(microseconds=1)) == utc(2026, 1, 1, 3)
    seconds = ScheduleSpec(cron="*/5 * * * * *")  # six fields: seconds first
    just_before = utc(2026, 1, 1, 0, 0, 5) - timedelta(microseconds=1)
    assert seconds.next_after(just_before) == utc(2026, 1, 1, 0, 0, 5)


def test_intervals_fire_on_multiples_since_the_epoch_whatever_the_zone_and_dst() -> None:
    spec = ScheduleSpec(every_ms=15 * 60_000, timezone="Europe/Berlin")
    assert spec.next_after(utc(2026, 3, 29, 0, 50)) == utc(2026, 3, 29, 1, 0)
    # Across the spring-forward change the fires keep 15 minutes of real time apart.
    got = fires(spec, utc(2026, 3, 29, 0, 40), 4)
    assert [b - a for a, b in itertools.pairwise(got)] == [timedelta(minutes=15)] * 3
    half = ScheduleSpec(every_ms=500)
    assert half.next_after(utc(2026, 1, 1, 0, 0, 1)) == utc(2026, 1, 1, 0, 0, 1) + timedelta(
        milliseconds=500
    )


@settings(max_examples=200, deadline=None)
@given(
    every_ms=st.integers(min_value=100, max_value=86_400_000),
    offset_us=st.integers(min_value=0, max_value=10**15),
)
def test_interval_fires_are_the_next_multiple(every_ms: int, offset_us: int) -> None:
    after = utc(1970, 1, 1) + timedelta(microseconds=offset_us)
    spec = ScheduleSpec(every_ms=every_ms)
    first, second = fires(spec, after, 2)
    step = timedelta(milliseconds=every_ms)
    assert after < first <= after + step
    assert (first - utc(1970, 1, 1)) % step == timedelta(0)
    assert second - first == step


@settings(max_examples=100, deadline=None)
@given(
    expression=st.sampled_from(
        ["30 2 * * *", "*/30 * * * *", "0 0 * * 0", "15 3 1 * *", "0 */6 * * *"]
    ),
    zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Sydney"]),
    start_s=st.integers(min_value=0, max_value=3 * 365 * 86400),
)
def test_cron_fires_increase_and_each_comes_once(expression: str, zone: str, start_s: int) -> None:
    spec = ScheduleSpec(cron=expression, timezone=zone)
    after = utc(2025, 1, 1) + timedelta(seconds=start_s)
    got = fires(spec, after, 6)
    assert got[0] > after
    assert all(a < b for a, b in itertools.pairwise(got))
    # Asking from just before any fire time gives that fire time (no fire is skipped).
    for moment in got:
        assert spec.next_after(moment - timedelta(microseconds=1)) == moment


def test_fires_between_counts_and_finds_the_first_at_or_after_the_end() -> None:
    spec = ScheduleSpec(every_ms=1000)
    assert spec.fires_between(utc(2026, 1, 1), utc(2026, 1, 1, 0, 0, 10), cap=100) == (
        10,
        utc(2026, 1, 1, 0, 0, 10),
    )
    cron = ScheduleSpec(cron="0 * * * *")
    assert cron.fires_between(utc(2026, 1, 1), utc(2026, 1, 1, 5, 30), cap=100) == (
        6,
        utc(2026, 1, 1, 6),
    )
    assert cron.fires_between(utc(2026, 1, 1), utc(2026, 1, 2), cap=3) == (3, utc(2026, 1, 2))


@pytest.mark.parametrize(
    ("text", "ms"),
    [("500ms", 500), ("2s", 2000), ("15m", 900_000), ("1h", 3_600_000), ("1d", 86_400_000)],
)
def test_durations(text: str, ms: int) -> None:
    assert parse_duration(text) == timedelta(milliseconds=ms)
    assert format_duration(parse_duration(text)) == text


@pytest.mark.parametrize("text", ["", "2", "1.5s", "-1s", "2 weeks", "1w", "s"])
def test_bad_durations_are_one_line(text: str) -> None:
    with pytest.raises(InputError, match=r"^--every: not a duration: .*500ms, 2s, 15m, 1h, 1d\)$"):
        parse_duration(text, what="--every")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": "61 * * * *"}, "invalid cron expression '61 \\* \\* \\* \\*'"),
        ({"cron": "* * *"}, "invalid cron expression"),
        ({"every_ms": 10}, "interval out of range"),
        ({"every_ms": 1000, "timezone": "Mars/Olympus"}, "unknown time zone: 'Mars/Olympus'"),
        ({}, "exactly one of"),
        ({"cron": "* * * * *", "every_ms": 1000}, "exactly one of"),
    ],
)
def test_bad_specs_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        ScheduleSpec(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("expression", ["30 2 * * *", "*/30 * * * *", "0 2 * * *", "59 2 * * *"])
@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York"])
def test_from_every_minute_around_a_dst_change_the_next_fire_is_later_and_consistent(
    expression: str, zone: str
) -> None:
    """Started at any minute of either change day (the repeated hour included), the next
    fire time is after the start, and asking again from just before it gives it again."""
    spec = ScheduleSpec(cron=expression, timezone=zone)
    days = (
        [utc(2026, 3, 28, 22), utc(2026, 10, 24, 22)]
        if zone == "Europe/Berlin"
        else [utc(2026, 3, 8, 4), utc(2026, 11, 1, 3)]
    )
    for day in days:
        for minute in range(0, 6 * 60, 3):
            after = day + timedelta(minutes=minute, seconds=17)
            moment = spec.next_after(after)
            assert moment > after
            assert spec.next_after(moment - timedelta(microseconds=1)) == moment
