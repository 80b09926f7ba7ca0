"""Durations as people write them: ``500ms``, ``2s``, ``15m``, ``1h``, ``1d``.

Plain code with no imports from the rest of Duplex, so that the command line, templates and
settings can all read durations the same way. One whole number and one unit: ``1h30m`` or
``1.5h`` is refused rather than guessed at (write ``90m``). Every refusal is a ``ValueError``
whose message is one line naming the text and what is expected; callers wrap it in their own
error type.
"""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["MAX_DURATION", "format_duration", "parse_duration"]

_UNITS = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
}
_PATTERN = re.compile(r"(\d{1,12})(ms|s|m|h|d)")
# Far beyond any delay that makes sense, well inside what ``timedelta`` and the databases hold.
MAX_DURATION = timedelta(days=3650)
EXPECTED = "a whole number and a unit, e.g. 500ms, 2s, 15m, 1h, 1d"


def parse_duration(text: str, *, allow_zero: bool = False) -> timedelta:
    """Return the ``timedelta`` that ``text`` writes; raise ``ValueError`` with one line."""
    if not isinstance(text, str):
        raise ValueError(f"a duration is a string such as '15m', not {text!r:.40}")
    cleaned = text.strip()
    match = _PATTERN.fullmatch(cleaned)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (expected {EXPECTED})")
    number, unit = match.groups()
    value = int(number) * _UNITS[unit]
    if value > MAX_DURATION:
        raise ValueError(f"duration {text!r} is over the limit of {MAX_DURATION.days}d")
    if value <= timedelta(0) and not allow_zero:
        raise ValueError(f"a duration must be longer than zero, not {text!r}")
    return value


def format_duration(value: timedelta) -> str:
    """Write ``value`` with the largest unit that keeps it whole (``90s`` -> ``90s``,
    ``3600s`` -> ``1h``); the inverse of ``parse_duration`` for whole milliseconds."""
    ms = round(value.total_seconds() * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
