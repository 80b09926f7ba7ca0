"""When a schedule fires: cron expressions in an IANA time zone, or fixed intervals.

Plain functions of the instant given, so that tests run them on a fake clock. Every instant
in and out is a timezone-aware UTC ``datetime``.

* **Cron** (``cronsim``, five fields, or six with seconds) is read in the schedule's time
  zone (``zoneinfo``). Across DST it behaves as Debian's cron does: a local time skipped by
  the spring-forward change fires at the first instant after the gap (02:30 in
  Europe/Berlin on the last Sunday of March fires at 03:00 CEST); a local time that happens
  twice at the fall-back change fires once, at its first occurrence (02:30 CEST), unless the
  expression names every hour (``*/30 * * * *`` fires in both 02:00-03:00 hours, since
  each of those instants matches).
* **Intervals** fire at the multiples of the interval counted from 1970-01-01T00:00Z: every
  worker computes the same instants whenever it started, ``--every 15m`` fires at :00, :15,
  :30 and :45, and the time zone plays no part (an interval is a length of real time; use
  cron for local wall-clock times).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from duplex import durations
from duplex.errors import InputError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# An interval shorter than this would fire faster than any worker polls.
MIN_INTERVAL_MS = 100
MAX_INTERVAL_MS = 366 * 86_400_000


def parse_duration(text: str, *, what: str | None = None) -> timedelta:
    """Read ``500ms``, ``2s``, ``15m``, ``1h`` or ``1d`` (``duplex.durations``); raise one-line
    ``InputError`` (prefixed with ``what``, the option or key, when given)."""
    try:
        return durations.parse_duration(text, allow_zero=True)
    except ValueError as exc:
        raise InputError((f"{what}: " if what else "") + str(exc)) from None


format_duration = durations.format_duration


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; one-line ``InputError`` when there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise InputError(
            f"unknown time zone: {name!r} (use an IANA name such as Europe/Berlin or UTC)"
        ) from None


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """A cron expression or an interval (exactly one), and the zone cron is read in."""

    cron: str | None = None
    every_ms: int | None = None
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every_ms is None):
            raise InputError("a schedule needs exactly one of a cron expression or an interval")
        tz = zone(self.timezone)
        if self.cron is not None:
            try:
                CronSim(self.cron, datetime.now(tz))
            except (CronSimError, ValueError) as exc:
                raise InputError(f"invalid cron expression {self.cron!r}: {exc}") from None
        elif self.every_ms is not None and not MIN_INTERVAL_MS <= self.every_ms <= MAX_INTERVAL_MS:
            raise InputError(
                f"interval out of range: {self.every_ms}ms (from {MIN_INTERVAL_MS}ms to 366d)"
            )

    def describe(self) -> str:
        """``cron 30 2 * * * (Europe/Berlin)`` or ``every 15m``."""
        if self.cron is not None:
            return f"cron {self.cron} ({self.timezone})"
        return f"every {format_duration(timedelta(milliseconds=self.every_ms or 0))}"

    def next_after(self, after: datetime) -> datetime:
        """The first fire time strictly after ``after`` (UTC)."""
        return next(self.fires_after(after))

    def fires_after(self, after: datetime) -> Iterator[datetime]:
        """Every fire time strictly after ``after``, in order (UTC)."""
        if after.tzinfo is None:
            raise ValueError("naive datetime given to a schedule")
        if self.every_ms is not None:
            step_us = self.every_ms * 1000
            elapsed_us = (after - EPOCH) // timedelta(microseconds=1)
            k = elapsed_us // step_us + 1
            while True:
                yield EPOCH + timedelta(microseconds=k * step_us)
                k += 1
        assert self.cron is not None
        # astimezone sets ``fold`` for a repeated local time, which cronsim honours.
        local = after.astimezone(zone(self.timezone))
        if local.microsecond:
            # cronsim works in whole seconds: 03:00:00.5 must not yield 03:00:00 again.
            local = local.replace(microsecond=0)
        last = after
        for moment in CronSim(self.cron, local):
            # Started inside the repeated hour of a fall-back change (fold=1), cronsim can
            # answer with the first occurrence of a local time, which is before ``after``:
            # only real instants later than the last one given count.
            instant = moment.astimezone(UTC)
            if instant > last:
                last = instant
                yield instant

    def fires_between(self, start: datetime, end: datetime, *, cap: int) -> tuple[int, datetime]:
        """Count the fire times in ``[start, end)`` (up to ``cap``); return the count and the
        first fire time at or after ``end``."""
        count = 0
        if start >= end:
            return 0, start
        if self.every_ms is not None:
            step = timedelta(milliseconds=self.every_ms)
            count = -((start - end) // step)  # ceil((end - start) / step)
            return count, start + count * step
        for moment in self.fires_after(start - _TICK):
            if moment >= end:
                return count, moment
            count += 1
            if count >= cap:
                return count, self.next_after(end - _TICK)
        raise AssertionError("unreachable: a cron expression fires forever")


_TICK = timedelta(microseconds=1)
