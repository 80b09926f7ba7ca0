"""Priority and delayed start: ``workflow_steps.priority``, the claim index that serves both,
and a ``task_execution_status`` that tells a task waiting for its start time from a ready one.

- ``priority`` (integer, -100..100, default 0): higher is claimed first within a namespace,
  with aging (docs/time.md, Priority).
- The claim index becomes ``(state, namespace, priority, next_attempt_at)``. The claim reads
  each priority level that has due work as one index range in ``next_attempt_at`` order and
  merges the levels (``duplex.storage.claims``), so steps whose ``next_attempt_at`` (the
  not-before time of a delayed start, the due time of a retry) is still to come lie past the
  end of every range read: the claim never reads them, however many there are.
- The view counts an ``enqueued`` step as ready only once its ``next_attempt_at`` has come, and
  says ``scheduled`` for a task whose only claimable steps wait for their start time.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_OLD_INDEX = (
    "ix_workflow_steps_state_namespace_next_attempt_at",
    ["state", "namespace", "next_attempt_at"],
)
_NEW_INDEX = (
    "ix_workflow_steps_state_namespace_priority_next_attempt_at",
    ["state", "namespace", "priority", "next_attempt_at"],
)

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
    CASE
        WHEN t.state = 'cancelled' THEN 'cancelled'
        WHEN SUM(CASE WHEN s.state = 'error' THEN 1 ELSE 0 END) > 0 THEN 'blocked_by_failures'
        WHEN SUM(CASE WHEN {ready} THEN 1 ELSE 0 END) > 0 THEN 'has_ready_steps'
        WHEN SUM(CASE WHEN s.state = 'in_progress' THEN 1 ELSE 0 END) > 0 THEN 'processing'
        {scheduled_rule}
        WHEN COUNT(s.step_uuid) > 0
         AND SUM(CASE WHEN s.state IN ('complete', 'resolved_manually') THEN 1 ELSE 0 END)
             = COUNT(s.step_uuid) THEN 'all_complete'
        ELSE 'waiting_for_dependencies'
    END AS execution_status
FROM tasks t
LEFT JOIN workflow_steps s ON s.task_uuid = t.task_uuid
GROUP BY t.task_uuid, t.state
"""
_READY_BEFORE = (
    "s.state = 'enqueued' OR (s.state = 'waiting_for_retry' AND s.next_attempt_at <= {now})"
)
_READY_NOW = (
    "(s.state = 'enqueued' AND (s.next_attempt_at IS NULL OR s.next_attempt_at <= {now}))"
    " OR (s.state = 'waiting_for_retry' AND s.next_attempt_at <= {now})"
)
_SCHEDULED_RULE = (
    "WHEN SUM(CASE WHEN s.state = 'enqueued' AND s.next_attempt_at > {now} THEN 1 ELSE 0 END)"
    " > 0 THEN 'scheduled'"
)
# SQLite keeps timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff' text in UTC; compare like with like.
_NOW = {"sqlite": "strftime('%Y-%m-%d %H:%M:%f000', 'now')", "postgresql": "now()"}


def _recreate(ready: str, scheduled_rule: str) -> None:
    now = _NOW[op.get_context().dialect.name]
    op.execute("DROP VIEW task_execution_status")
    op.execute(
        _VIEW_SQL.format(ready=ready.format(now=now), scheduled_rule=scheduled_rule.format(now=now))
    )


def upgrade() -> None:
    # A constant default: PostgreSQL (11+) and SQLite add the column without rewriting rows.
    op.add_column(
        "workflow_steps",
        sa.Column("priority", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index(_NEW_INDEX[0], "workflow_steps", _NEW_INDEX[1])
    op.drop_index(_OLD_INDEX[0], table_name="workflow_steps")
    _recreate(_READY_NOW, _SCHEDULED_RULE)


def downgrade() -> None:
    _recreate(_READY_BEFORE, "")
    op.create_index(_OLD_INDEX[0], "workflow_steps", _OLD_INDEX[1])
    op.drop_index(_NEW_INDEX[0], table_name="workflow_steps")
    op.drop_column("workflow_steps", "priority")  # SQLite >= 3.35 drops columns in place
