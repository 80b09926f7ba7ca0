"""What a due schedule does at a given instant: overlap policies and catch-up (fake clock)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from duplex.schedules.firing import (
    MISSED_COUNT_CAP,
    DueSchedule,
    FirePlan,
    MissedFires,
    fire_time_text,
    idempotency_key,
    plan,
)
from duplex.schedules.spec import ScheduleSpec

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)


def due(
    overlap: str = "skip",
    *,
    open_run: bool = False,
    next_at: datetime = T0,
    buffered: datetime | None = None,
    every_s: int = 10,
    catchup: timedelta = timedelta(minutes=1),
) -> DueSchedule:
    return DueSchedule(
        "s", ScheduleSpec(every_ms=every_s * 1000), overlap, catchup, next_at, buffered, open_run
    )


def test_not_yet_due_changes_nothing() -> None:
    decided = plan(due(), T0 - S)
    assert decided == FirePlan(T0, None)
    assert not decided.changes_anything


@pytest.mark.parametrize("overlap", ["skip", "buffer_one", "allow"])
def test_with_no_run_open_every_policy_fires_and_moves_on(overlap: str) -> None:
    assert plan(due(overlap), T0) == FirePlan(T0 + 10 * S, None, fire_at=T0)


def test_skip_records_the_fire_time_as_skipped_while_the_previous_run_is_open() -> None:
    assert plan(due("skip", open_run=True), T0 + S) == FirePlan(T0 + 10 * S, None, skipped=T0)


def test_allow_fires_although_the_previous_run_is_open() -> None:
    assert plan(due("allow", open_run=True), T0) == FirePlan(T0 + 10 * S, None, fire_at=T0)


def test_buffer_one_holds_one_fire_back_skips_the_next_and_fires_it_when_the_run_ends() -> None:
    first = plan(due("buffer_one", open_run=True), T0)
    assert first == FirePlan(T0 + 10 * S, T0)  # held back: no task, no skip
    assert first.changes_anything is False
    assert first.buffered_fire_at == T0
    second = plan(due("buffer_one", open_run=True, next_at=T0 + 10 * S, buffered=T0), T0 + 10 * S)
    assert second == FirePlan(T0 + 20 * S, T0, skipped=T0 + 10 * S)
    # The run ended: the held-back fire goes at once, before its next fire time.
    ended = due("buffer_one", open_run=False, next_at=T0 + 20 * S, buffered=T0)
    assert plan(ended, T0 + 15 * S) == FirePlan(T0 + 20 * S, None, fire_at=T0)


def test_a_fire_inside_the_catch_up_window_is_fired_late() -> None:
    assert plan(due(), T0 + 59 * S) == FirePlan(T0 + 10 * S, None, fire_at=T0)
    # Exactly at the window's edge it is still inside.
    assert plan(due(), T0 + 60 * S).fire_at == T0


def test_fires_beyond_the_window_are_one_missed_range_and_the_first_inside_fires() -> None:
    # Down from 12:00:00 to 12:05:00 with a 1-minute window: 12:00:00..12:03:50 missed (24
    # fire times), 12:04:00 is the first inside the window.
    decided = plan(due(), T0 + 300 * S)
    assert decided.missed == MissedFires(T0, 24)
    assert decided.fire_at == T0 + 240 * S
    assert decided.next_fire_at == T0 + 250 * S


def test_missed_fires_with_none_inside_the_window_wait_for_the_next() -> None:
    decided = plan(due(every_s=3600, catchup=timedelta(minutes=5)), T0 + 30 * 60 * S)
    assert decided == FirePlan(T0 + 3600 * S, None, missed=MissedFires(T0, 1))


def test_catch_up_under_skip_fires_once_then_skips_while_that_run_is_open() -> None:
    now = T0 + 35 * S
    first = plan(due("skip"), now)
    assert first.fire_at == T0
    assert first.missed is None
    state = due("skip", open_run=True, next_at=first.next_fire_at)
    seen = []
    while state.next_fire_at <= now:
        decided = plan(state, now)
        seen.append(decided.skipped)
        state = replace(state, next_fire_at=decided.next_fire_at)
    assert seen == [T0 + 10 * S, T0 + 20 * S, T0 + 30 * S]
    assert state.next_fire_at == T0 + 40 * S


def test_catch_up_under_allow_fires_every_fire_time_in_the_window() -> None:
    now = T0 + 35 * S
    state = due("allow", open_run=True)
    fired = []
    while (decided := plan(state, now)).fire_at is not None:
        fired.append(decided.fire_at)
        state = replace(state, next_fire_at=decided.next_fire_at)
    assert fired == [T0, T0 + 10 * S, T0 + 20 * S, T0 + 30 * S]


def test_a_huge_gap_counts_at_most_the_cap_for_cron() -> None:
    spec = ScheduleSpec(cron="* * * * * *")  # every second
    state = DueSchedule("s", spec, "skip", timedelta(seconds=5), T0, None, False)
    decided = plan(state, T0 + timedelta(days=3))
    assert decided.missed is not None
    assert decided.missed.count == MISSED_COUNT_CAP
    assert "100000+ fire time(s)" in decided.missed.describe(timedelta(seconds=5))
    assert decided.fire_at == T0 + timedelta(days=3) - 5 * S


def test_idempotency_key_names_the_schedule_and_the_fire_time_in_utc() -> None:
    assert idempotency_key("nightly", T0) == "schedule:nightly@2026-12-04T12:00:00Z"
    assert fire_time_text(T0 + timedelta(milliseconds=500)) == "2026-12-04T12:00:00.500Z"
