"""Rows of ``workflow_step_transitions``: one per state change."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.models import (
    workflow_steps,
)

ws = workflow_steps


def transition_row(
    step_uuid: str,
    from_state: str | None,
    to_state: str,
    attempt: int,
    worker_id: str | None,
    now: datetime,
    reason: str | None,
) -> dict[str, Any]:
    """Build one ``workflow_step_transitions`` row."""
    return {
        "step_uuid": step_uuid,
        "from_state": from_state,
        "to_state": to_state,
        "attempt": attempt,
        "worker_id": worker_id,
        "reason": reason,
        "created_at": now,
    }
