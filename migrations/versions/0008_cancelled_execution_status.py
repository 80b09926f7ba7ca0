"""The ``task_execution_status`` view says ``cancelled`` for a cancelled task.

Before, a cancelled task read ``waiting_for_dependencies`` (its steps are ``cancelled``, which
no other rule matches). A cancelled task never runs again (``duplex retry`` refuses its
steps), so ``cancelled`` comes first in the precedence: a step that was running when the task
was cancelled still finishes, but the task is cancelled all the same.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# The columns are those of 0001's view; only the status gains its first rule, which reads the
# task's own state (hence ``t.state`` in the GROUP BY).
_VIEW_SQL = """
CREATE VIEW task_execution_status AS
SELECT
    t.task_uuid AS task_uuid,
    COUNT(s.step_uuid) AS total_steps,
    COALESCE(SUM(CASE WHEN s.state = 'pending' THEN 1 ELSE 0 END), 0) AS pending_steps,
    COALESCE(SUM(CASE WHEN s.state = 'enqueued'
                        OR (s.state = 'waiting_for_retry' AND s.next_attempt_at <= {now})
                      THEN 1 ELSE 0 END), 0) AS ready_steps,
    COALESCE(SUM(CASE WHEN s.state = 'in_progress' THEN 1 ELSE 0 END), 0) AS in_progress_steps,
    COALESCE(SUM(CASE WHEN s.state = 'waiting_for_retry' THEN 1 ELSE 0 END), 0)
        AS waiting_for_retry_steps,
    COALESCE(SUM(CASE WHEN s.state = 'complete' THEN 1 ELSE 0 END), 0) AS complete_steps,
    COALESCE(SUM(CASE WHEN s.state = 'resolved_manually' THEN 1 ELSE 0 END), 0)
        AS resolved_steps,
    COALESCE(SUM(CASE WHEN s.state = 'error' THEN 1 ELSE 0 END), 0) AS error_steps,
    COALESCE(SUM(CASE WHEN s.state = 'cancelled' THEN 1 ELSE 0 END), 0) AS cancelled_steps,
    CASE
        {first_rule}
        WHEN SUM(CASE WHEN s.state = 'error' THEN 1 ELSE 0 END) > 0 THEN 'blocked_by_failures'
        WHEN SUM(CASE WHEN s.state = 'enqueued'
                        OR (s.state = 'waiting_for_retry' AND s.next_attempt_at <= {now})
                      THEN 1 ELSE 0 END) > 0 THEN 'has_ready_steps'
        WHEN SUM(CASE WHEN s.state = 'in_progress' THEN 1 ELSE 0 END) > 0 THEN 'processing'
        WHEN COUNT(s.step_uuid) > 0
         AND SUM(CASE WHEN s.state IN ('complete', 'resolved_manually') THEN 1 ELSE 0 END)
             = COUNT(s.step_uuid) THEN 'all_complete'
        ELSE 'waiting_for_dependencies'
    END AS execution_status
FROM tasks t
LEFT JOIN workflow_steps s ON s.task_uuid = t.task_uuid
GROUP BY {group_by}
"""
_CANCELLED_FIRST = "WHEN t.state = 'cancelled' THEN 'cancelled'"

# SQLite keeps timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff' text in UTC; compare like with like.
_NOW = {"sqlite": "strftime('%Y-%m-%d %H:%M:%f000', 'now')", "postgresql": "now()"}


def _recreate(first_rule: str, group_by: str) -> None:
    now = _NOW[op.get_context().dialect.name]
    op.execute("DROP VIEW task_execution_status")
    op.execute(_VIEW_SQL.format(now=now, first_rule=first_rule, group_by=group_by))


def upgrade() -> None:
    _recreate(_CANCELLED_FIRST, "t.task_uuid, t.state")


def downgrade() -> None:
    _recreate("", "t.task_uuid")
