"""Cancelling what is running: a step's cancel request, and a view that counts a step
cancelled on its own as blocking.

``workflow_steps.cancel_requested_at``: when ``duplex cancel --step`` asked the running attempt
of this step to stop. The worker running it finds it at its next sweep
(``duplex.storage.cancels``, with the attempts of cancelled tasks) and cancels the attempt; a
``duplex retry`` of the step clears it. No index: the sweep reads only running attempts.

``task_execution_status`` says ``blocked_by_failures`` when a step is ``error`` or
``cancelled`` (in a task that is not itself cancelled, only ``duplex cancel --step`` leaves a
cancelled step, and its dependents can no longer run, as after an error).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

# The view of 0014, with the blocking states as a parameter. A migration does not import the
# code, nor another migration: the text is repeated.
_VIEW_SQL = """
CREATE VIEW task_execution_status AS
SELECT
    t.task_uuid AS task_uuid,
    COUNT(s.step_uuid) AS total_steps,
    COALESCE(SUM(CASE WHEN s.state = 'pending' THEN 1 ELSE 0 END), 0) AS pending_steps,
    COALESCE(SUM(CASE WHEN {ready} THEN 1 ELSE 0 END), 0) AS ready_steps,
    COALESCE(SUM(CASE WHEN s.state = 'in_progress' THEN 1 ELSE 0 END), 0) AS in_progress_steps,
    COALESCE(SUM(CASE WHEN s.state = 'waiting_for_retry' THEN 1 ELSE 0 END), 0)
        AS waiting_for_retry_steps,
    COALESCE(SUM(CASE WHEN s.state = 'complete' THEN 1 ELSE 0 END), 0) AS complete_steps,
    COALESCE(SUM(CASE WHEN s.state = 'resolved_manually' THEN 1 ELSE 0 END), 0)
        AS resolved_steps,
    COALESCE(SUM(CASE WHEN s.state = 'error' THEN 1 ELSE 0 END), 0) AS error_steps,
    COALESCE(SUM(CASE WHEN s.state = 'cancelled' THEN 1 ELSE 0 END), 0) AS cancelled_steps,
    COALESCE(SUM(CASE WHEN s.state = 'skipped' THEN 1 ELSE 0 END), 0) AS skipped_steps,
    COALESCE(SUM(CASE WHEN s.state = 'waiting' THEN 1 ELSE 0 END), 0) AS waiting_steps,
    CASE
        WHEN t.state = 'cancelled' THEN 'cancelled'
        WHEN SUM(CASE WHEN s.state IN ({blocking}) THEN 1 ELSE 0 END) > 0
             THEN 'blocked_by_failures'
        WHEN SUM(CASE WHEN {ready} THEN 1 ELSE 0 END) > 0 THEN 'has_ready_steps'
        WHEN SUM(CASE WHEN s.state = 'in_progress' THEN 1 ELSE 0 END) > 0 THEN 'processing'
        WHEN SUM(CASE WHEN s.state = 'enqueued' AND s.next_attempt_at > {now} THEN 1 ELSE 0 END)
             > 0 THEN 'scheduled'
        WHEN COUNT(s.step_uuid) > 0
         AND SUM(CASE WHEN s.state IN ('complete', 'resolved_manually', 'skipped')
                  THEN 1 ELSE 0 END) = COUNT(s.step_uuid) THEN 'all_complete'
        ELSE 'waiting_for_dependencies'
    END AS execution_status
FROM tasks t
LEFT JOIN workflow_steps s ON s.task_uuid = t.task_uuid
GROUP BY t.task_uuid, t.state
"""
_READY = (
    "(s.state = 'enqueued' AND (s.next_attempt_at IS NULL OR s.next_attempt_at <= {now}))"
    " OR (s.state = 'waiting_for_retry' AND s.next_attempt_at <= {now})"
)
# SQLite keeps timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff' text in UTC; compare like with like.
# Its clock reads milliseconds: "now" is the end of the current millisecond (``%f999``), so a
# step made ready within it (``next_attempt_at`` = the writer's clock, to the microsecond)
# reads as ready, not as scheduled for later in that same millisecond.
_NOW = {"sqlite": "strftime('%Y-%m-%d %H:%M:%f999', 'now')", "postgresql": "now()"}


def _recreate_view(blocking: str) -> None:
    now = _NOW[op.get_context().dialect.name]
    op.execute("DROP VIEW task_execution_status")
    op.execute(_VIEW_SQL.format(now=now, ready=_READY.format(now=now), blocking=blocking))


def upgrade() -> None:
    op.add_column(
        "workflow_steps",
        sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True),
    )
    _recreate_view("'error', 'cancelled'")


def downgrade() -> None:
    _recreate_view("'error'")
    op.drop_column("workflow_steps", "cancel_requested_at")
