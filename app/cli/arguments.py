"""Types of the ``duplex`` command line's arguments: each rejects a bad value with one line."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta
from typing import Any

from duplex.durations import parse_duration
from duplex.templates import PRIORITY_MAX, PRIORITY_MIN


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text}")
    return value


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535: {value}")
    return value


def aware_datetime(text: str) -> datetime:
    """An ISO 8601 time with its offset (``2026-12-24T08:00:00+01:00``, ``...Z``)."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time: {text!r} (e.g. 2026-12-24T08:00:00+01:00)"
        ) from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no time zone: add one, e.g. {text.strip()}Z or {text.strip()}+01:00"
        )
    return value


def duration(text: str) -> timedelta:
    """A duration: ``500ms``, ``2s``, ``15m``, ``1h``, ``1d``."""
    try:
        return parse_duration(text, allow_zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_duration(text: str) -> timedelta:
    """A duration longer than zero (a deadline): ``500ms``, ``2s``, ``15m``, ``1h``, ``1d``."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def priority(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise argparse.ArgumentTypeError(
            f"priority {value} out of range: from {PRIORITY_MIN} (lowest) to {PRIORITY_MAX}"
        )
    return value


def json_value(text: str) -> Any:
    """Any JSON value (a signal's payload): ``{"ok": true}``, ``42``, ``"yes"``."""
    try:
        return json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r:.80} ({exc})") from None


def json_object(text: str) -> dict[str, Any]:
    """A JSON object (a step's result): ``{"approved": true}``."""
    value = json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f'not a JSON object: {text!r:.80} (a result is an object, e.g. {{"ok": true}})'
        )
    return value


def _not_json(name: str) -> None:
    # Python's json accepts NaN and Infinity; JSON (and PostgreSQL) do not.
    raise ValueError(f"{name} is not a JSON value")
