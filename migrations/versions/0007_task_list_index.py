"""Task list index: ``tasks (created_at, task_uuid)``, for the dashboard's newest-first pages.

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


def downgrade() -> None:
    op.drop_index("ix_tasks_created_at_task_uuid", table_name="tasks")
