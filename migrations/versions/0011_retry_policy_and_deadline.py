"""Per-step retry policy and task deadline.

``workflow_steps.retry_policy``: the fields of ``[retry]`` a step's ``[steps.retry]``
overrides (JSON; NULL for a step that overrides nothing), read with the step when it is
claimed, so the commit that fails an attempt applies the step's own backoff.

``tasks.deadline_at``: when the task must be finished (submission time + ``max_duration``;
NULL: no deadline). A partial index holds only the unfinished tasks that have one, so the
periodic deadline sweep costs nothing for the rest (``duplex.storage.deadlines``).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_OPEN_WITH_DEADLINE = "deadline_at IS NOT NULL AND state IN ('pending', 'in_progress')"


def upgrade() -> None:
    # Plain ALTER TABLE: nullable columns need no batch copy of the tables.
    json_type = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    op.add_column("workflow_steps", sa.Column("retry_policy", json_type, nullable=True))
    op.add_column("tasks", sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_tasks_open_deadline",
        "tasks",
        ["deadline_at"],
        sqlite_where=sa.text(_OPEN_WITH_DEADLINE),
        postgresql_where=sa.text(_OPEN_WITH_DEADLINE),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_open_deadline", table_name="tasks")
    op.drop_column("tasks", "deadline_at")  # SQLite >= 3.35 drops columns in place
    op.drop_column("workflow_steps", "retry_policy")
