"""Trace context: ``tasks.trace_context``, the W3C carrier given at submit.

Every step of the task continues that trace (``observability.tracing``), so a workflow shows
as one trace whichever workers run its steps.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE (no batch copy of ``tasks``, which the status view reads).
    op.add_column(
        "tasks",
        sa.Column("trace_context", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("tasks", "trace_context")
