"""Idempotency keys: ``tasks.idempotency_key``, unique per template name.

A submitter that retries (a web request, a cron job) passes the same key; the second
submission finds the first task instead of starting a second workflow.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE on both backends: a batch (copy-and-rename) of ``tasks`` on SQLite
    # would break the task_execution_status view that reads it.
    op.add_column("tasks", sa.Column("idempotency_key", sa.String(255), nullable=True))
    # NULLs are distinct in a unique index on both backends: keyless tasks never collide.
    op.create_index(
        "ux_tasks_name_idempotency_key", "tasks", ["name", "idempotency_key"], unique=True
    )


def downgrade() -> None:
    op.drop_index("ux_tasks_name_idempotency_key", table_name="tasks")
    op.drop_column("tasks", "idempotency_key")  # SQLite >= 3.35 drops columns in place
