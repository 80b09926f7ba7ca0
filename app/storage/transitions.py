"""Rows of ``workflow_step_transitions``: one per state change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, insert

from duplex.storage.driver import BulkStatement
from duplex.storage.models import workflow_step_transitions

wst = workflow_step_transitions

TransitionRow = tuple[str, str | None, str, int, str | None, Any, str | None]

_COLUMNS = ("step_uuid", "from_state", "to_state", "attempt", "worker_id", "created_at", "reason")
_INSERT_TRANSITIONS = BulkStatement(
    insert(wst).values({name: bindparam(name, type_=wst.c[name].type) for name in _COLUMNS}),
    _COLUMNS,
)


def transition_row(
    step_uuid: str,
    from_state: str | None,
    to_state: str,
    attempt: int,
    worker_id: str | None,
    at: Any,
    reason: str | None,
) -> TransitionRow:
    """Build one transition row; ``at`` is the time as ``db_time`` gives it."""
    return (step_uuid, from_state, to_state, attempt, worker_id, at, reason)


def insert_transitions(conn: Connection, rows: Sequence[TransitionRow]) -> None:
    """Record state changes, one row each."""
    _INSERT_TRANSITIONS.execute(conn, rows)


def insert_pending(conn: Connection, rows: list[TransitionRow]) -> None:
    """Insert the rows a transaction has gathered so far, and empty the list: before a writer
    that inserts its own, so that every step's history keeps the order its changes were made."""
    insert_transitions(conn, rows)
    rows.clear()
