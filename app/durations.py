"""Durations as users write them: ``500ms``, ``2s``, ``15m``, ``1h``, ``1d``.

One integer and one unit, nothing else: a template's ``max_duration`` and ``duplex submit
--max-duration`` are read by people, so ``1h30m``, ``1.5h`` or a bare number are refused
rather than guessed at. Plain code, no I/O; the callers turn ``ValueError`` into their own
one-line errors.
"""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["MAX_DURATION", "format_duration", "parse_duration"]

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_PATTERN = re.compile(r"(\d{1,12})(ms|s|m|h|d)")
# Far beyond any sensible deadline, and well inside what ``datetime`` can add to today.
MAX_DURATION = timedelta(days=3650)


def parse_duration(text: str) -> timedelta:
    """Return the duration ``text`` spells; raise ValueError (one line) when it spells none.

    Zero is refused: every caller uses a duration as a span that must pass.
    """
    if not isinstance(text, str):
        raise ValueError(f"a duration is a string such as '15m', not {text!r:.40}")
    match = _PATTERN.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"not a duration: {text!r:.40} (write an integer and one unit: 500ms, 2s, 15m, 1h, 1d)"
        )
    value = timedelta(milliseconds=int(match.group(1)) * _UNIT_MS[match.group(2)])
    if value <= timedelta(0):
        raise ValueError(f"a duration must be longer than zero, not {text!r}")
    if value > MAX_DURATION:
        raise ValueError(f"duration {text!r} is over the limit of {MAX_DURATION.days}d")
    return value


def format_duration(value: timedelta) -> str:
    """Spell ``value`` in the largest unit that divides it exactly (``90s`` -> ``90s``,
    ``3600s`` -> ``1h``); the inverse of ``parse_duration`` for whole milliseconds."""
    ms = round(value.total_seconds() * 1000)
    for unit in ("d", "h", "m", "s"):
        if ms and ms % _UNIT_MS[unit] == 0:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms}ms"
