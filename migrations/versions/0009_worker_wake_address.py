"""Wake address: ``workers.wake_address``, where a worker on SQLite takes local wake-ups.

A worker on SQLite binds a Unix datagram socket and records its address here; whoever makes
work ready on the same host (the ``Client``, ``duplex retry``) sends it a datagram so that it
looks at once rather than at its next poll (``duplex.intake.wake``). NULL for workers on
PostgreSQL, whose wake-up is the work notification (0002).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE: a nullable column needs no batch copy of ``workers``.
    op.add_column("workers", sa.Column("wake_address", sa.String(255), nullable=True))


def downgrade() -> None:
    op.drop_column("workers", "wake_address")  # SQLite >= 3.35 drops columns in place
