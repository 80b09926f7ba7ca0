"""Parsing what a submitter gives: the task context as JSON."""

from __future__ import annotations

import json

from duplex.errors import InputError
from duplex.messages import JSONDict


def parse_context(text: str | None) -> JSONDict:
    """Parse ``--context`` JSON; it must be an object."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON context: {exc}") from None
    except ValueError as exc:
        raise InputError(f"invalid JSON context: {exc}") from None
    except RecursionError:
        raise InputError("invalid JSON context: nested too deeply") from None
    if not isinstance(value, dict):
        raise InputError(f"invalid JSON context: expected an object, got {type(value).__name__}")
    return value


def _reject_constant(name: str) -> None:
    # Python's json accepts NaN and Infinity; JSON (and PostgreSQL) do not.
    raise ValueError(f"{name} is not a JSON value")
