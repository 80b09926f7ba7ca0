"""Rate limits: at most ``limit`` starts per ``period`` (plus ``burst`` at once), on every
worker together.

A step names a limit (``rate_limit = "payment_api"``, or ``{ name = "payment_api", units =
2 }``); the limits are rows of ``rate_limits`` (``duplex limits set payment_api 100/s``, or
``[rate_limits]`` in the settings). The bucket is the generic cell rate algorithm: its whole
state is one time, ``tat`` (the theoretical arrival time), so taking a token is one update of
one row, whatever the number of workers. A start takes its tokens at its own time
(``reserve(...).start_at`` is then *now*); in any window of one period (half-open) at most
``limit + burst`` one-unit starts go (a start of N units may go on its first unit's token and
leave the bucket owing the rest). A start that finds no token learns when it is expected
(``start_at``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from duplex.durations import parse_duration

MAX_UNITS = 1000
_NAME = r"^[A-Za-z0-9_.-]{1,255}$"
_RATE = re.compile(r"^\s*(\d{1,9})\s*/\s*(\d*)\s*(ms|s|m|h|d)\s*$")
RATE_EXPECTED = "a rate such as 100/s, 10/m, 5/200ms, 1000/h or 50/1d"

LimitName = Annotated[str, Field(strict=True, pattern=_NAME)]


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` units per ``period``; ``burst`` more may start at once."""

    limit: int
    period: timedelta
    burst: int = 0

    @property
    def interval(self) -> timedelta:
        """The time one unit's token takes to come, rounded up to a whole microsecond (never
        shorter than the rate says: 3/s is 333,334 us)."""
        return timedelta(microseconds=-(-_micros(self.period) // self.limit))

    def reserve(self, tat: datetime | None, now: datetime, units: int = 1) -> Reservation:
        """Take ``units`` tokens for a start no earlier than ``now``, from a bucket whose
        theoretical arrival time is ``tat`` (None: a full bucket).

        A start may go once one unit's token is there; a start of several units then leaves
        the bucket owing the rest, which the next starts wait for (so a step of more units
        than the burst allows still starts, never waits forever)."""
        base = now if tat is None or tat < now else tat
        earliest = base - self.burst * self.interval
        return Reservation(start_at=max(now, earliest), tat=base + units * self.interval)

    def tokens(self, tat: datetime | None, now: datetime) -> float:
        """Units that could start now (for ``duplex limits list``)."""
        if tat is None or tat <= now:
            return float(self.burst + 1)
        return max(0.0, self.burst + 1 - (tat - now) / self.interval)

    def rescaled(self, tat: datetime | None, now: datetime, before: Rate) -> datetime | None:
        """The bucket's ``tat`` under this rate, for a bucket that ran at ``before`` until
        ``now``: the units it owes are kept, to be paid at this rate (a change takes effect
        at once, not once the old debt is paid at the old rate)."""
        if tat is None or tat <= now:
            return tat
        owed = (tat - now) / before.interval
        return now + owed * self.interval

    def text(self) -> str:
        """``100/s``: how ``duplex limits set`` takes it and ``list`` shows it."""
        ms = round(self.period.total_seconds() * 1000)
        for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
            if ms % size == 0:
                count = ms // size
                return f"{self.limit}/{unit}" if count == 1 else f"{self.limit}/{count}{unit}"
        return f"{self.limit}/{ms}ms"


@dataclass(frozen=True, slots=True)
class Reservation:
    start_at: datetime
    tat: datetime


def parse_rate(text: str, burst: int = 0) -> Rate:
    """``100/s`` -> Rate(100, 1 s); ValueError naming the problem otherwise."""
    match = _RATE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"invalid rate {text!r}: expected {RATE_EXPECTED}")
    limit, count, unit = int(match[1]), match[2] or "1", match[3]
    if limit < 1:
        raise ValueError(f"invalid rate {text!r}: at least 1 per period")
    try:
        period = parse_duration(f"{int(count)}{unit}")
    except ValueError as exc:
        raise ValueError(f"invalid rate {text!r}: {exc}") from None
    if not 0 <= burst <= 1_000_000:
        raise ValueError(f"invalid burst {burst}: 0 to 1000000")
    if limit > _micros(period):
        raise ValueError(f"invalid rate {text!r}: at most 1 per microsecond")
    return Rate(limit, period, burst)


def _micros(period: timedelta) -> int:
    return period // timedelta(microseconds=1)


class RateLimitUse(BaseModel):
    """A step's ``rate_limit``: the limit's name and how many units one start takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: LimitName
    units: Annotated[int, Field(strict=True, ge=1, le=MAX_UNITS)] = 1

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        """``rate_limit = "payment_api"`` is ``{ name = "payment_api" }``."""
        return {"name": value} if isinstance(value, str) else value


class DeclaredLimit(BaseModel):
    """``[rate_limits]`` in the settings: ``NAME = "100/s"`` or ``{ rate = "100/s", burst =
    20 }``; inserted by a worker at start when no limit of that name exists."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: str
    burst: Annotated[int, Field(ge=0, le=1_000_000)] = 0

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        return {"rate": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _rate_parses(self) -> DeclaredLimit:
        parse_rate(self.rate, self.burst)
        return self

    def parsed(self) -> Rate:
        return parse_rate(self.rate, self.burst)


class RateLimitedStep(Protocol):
    """What the check needs of a template step (``duplex.templates.StepTemplate``)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def rate_limit(self) -> RateLimitUse | None: ...


def rate_problems(steps: Sequence[RateLimitedStep]) -> list[str]:
    """A rate limit is for a step that runs a handler (empty: nothing wrong)."""
    return [
        f"step {step.name!r}: a {step.kind} step runs no handler; `rate_limit` is for the "
        "steps that do"
        for step in steps
        if step.rate_limit is not None and step.kind in ("wait", "sleep")
    ]
