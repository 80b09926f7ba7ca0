"""When a submission may start and at what priority: the checks of ``run_at``, ``delay`` and
``priority``, shared by ``Client.submit`` and ``duplex submit``.

Plain code. Every refusal is an ``InputError`` of one line, raised before anything is written.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from duplex.errors import InputError
from duplex.templates import PRIORITY_MAX, PRIORITY_MIN

# As far ahead as a delayed start may be: far beyond any sensible plan, and well inside what
# every database and ``datetime`` hold.
MAX_AHEAD = timedelta(days=3650)


def start_time(
    run_at: datetime | None, delay: timedelta | None, *, now: datetime
) -> datetime | None:
    """Return when the task's roots may first be claimed, or None for "now".

    ``run_at`` must be aware (a naive time names no instant); a time already past means now.
    ``delay`` counts from ``now``. Not both.
    """
    if run_at is not None and delay is not None:
        raise InputError("give run_at or delay, not both")
    if delay is not None:
        if not isinstance(delay, timedelta):
            raise InputError(f"delay must be a timedelta, not {type(delay).__name__}")
        if delay < timedelta(0):
            raise InputError(f"delay must not be negative: {delay}")
        if delay > MAX_AHEAD:
            raise InputError(f"delay too long: {delay} (at most {MAX_AHEAD.days} days)")
        return now + delay if delay else None
    if run_at is None:
        return None
    if not isinstance(run_at, datetime):
        raise InputError(f"run_at must be a datetime, not {type(run_at).__name__}")
    if run_at.tzinfo is None or run_at.utcoffset() is None:
        raise InputError(
            f"run_at {run_at.isoformat()} has no time zone: give an aware datetime "
            "(e.g. with tzinfo=UTC, or +01:00 in ISO 8601)"
        )
    if run_at - now > MAX_AHEAD:
        raise InputError(
            f"run_at too far ahead: {run_at.isoformat()} (at most {MAX_AHEAD.days} days)"
        )
    return run_at if run_at > now else None


def checked_priority(priority: int | None) -> int | None:
    """Return ``priority`` if it is an integer in the accepted range; else refuse it."""
    if priority is None:
        return None
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InputError(f"priority must be an integer, not {priority!r:.40}")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InputError(
            f"priority {priority} out of range: from {PRIORITY_MIN} (lowest) "
            f"to {PRIORITY_MAX} (highest)"
        )
    return priority
