"""Task list indexes: ``tasks (created_at, task_uuid)`` for the dashboard's newest-first pages,
and ``tasks (state, created_at)`` for its state filter and its counts of unfinished tasks.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_created_at_task_uuid", "tasks", ["created_at", "task_uuid"])
    op.create_index("ix_tasks_state_created_at", "tasks", ["state", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_tasks_state_created_at", table_name="tasks")
    op.drop_index("ix_tasks_created_at_task_uuid", table_name="tasks")
