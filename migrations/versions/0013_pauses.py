"""Pauses: ``pauses``, the namespaces and templates whose steps are not claimed.

``duplex pause NAME`` writes a row, ``duplex resume NAME`` deletes it; every claim leaves out
the steps of a paused namespace or of a task made from a paused template
(``duplex.storage.pauses``). Steps already running finish and commit as usual.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pauses",
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("paused_by", sa.String(255), nullable=False),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("kind", "name", name="pk_pauses"),
    )


def downgrade() -> None:
    op.drop_table("pauses")
