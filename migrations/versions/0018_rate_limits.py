"""Rate limits: named limits in SQL, and the steps that take their tokens.

``rate_limits``: one row per limit (``duplex limits set NAME 100/s``): ``limit`` units per
``period_ms``, ``burst`` more at once, and the bucket's whole state, ``tat`` (the generic cell
rate algorithm's theoretical arrival time; NULL: full). ``workflow_steps.rate_limit`` and
``rate_units``: the limit each start of the step takes tokens of, and how many; the partial
index finds when the next step waiting for a limit's tokens is due (steps without a limit cost
it nothing).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

_INDEX = "ix_workflow_steps_rate_limit_waiting"
_LIMITED = sa.text("rate_limit IS NOT NULL")


def upgrade() -> None:
    op.create_table(
        "rate_limits",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("limit", sa.Integer(), nullable=False),
        sa.Column("period_ms", sa.BigInteger(), nullable=False),
        sa.Column("burst", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("tat", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_rate_limits"),
    )
    op.add_column("workflow_steps", sa.Column("rate_limit", sa.String(255), nullable=True))
    op.add_column("workflow_steps", sa.Column("rate_units", sa.Integer(), nullable=True))
    op.create_index(
        _INDEX,
        "workflow_steps",
        ["rate_limit", "state", "next_attempt_at"],
        sqlite_where=_LIMITED,
        postgresql_where=_LIMITED,
    )


def downgrade() -> None:
    op.drop_index(_INDEX, table_name="workflow_steps")
    op.drop_column("workflow_steps", "rate_units")
    op.drop_column("workflow_steps", "rate_limit")
    op.drop_table("rate_limits")
