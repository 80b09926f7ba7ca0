"""Index workflow_steps on (task_uuid, state) in place of (task_uuid).

Task state is derived after each commit by probing which states a task's steps are in; with
this index each probe is one seek, whatever the size of the task.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_workflow_steps_task_uuid_state", "workflow_steps", ["task_uuid", "state"])
    op.drop_index("ix_workflow_steps_task_uuid", table_name="workflow_steps")


def downgrade() -> None:
    op.create_index("ix_workflow_steps_task_uuid", "workflow_steps", ["task_uuid"])
    op.drop_index("ix_workflow_steps_task_uuid_state", table_name="workflow_steps")
