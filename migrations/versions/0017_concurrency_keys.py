"""Concurrency keys: at most N attempts with the same key run at once, on every worker.

``workflow_steps.concurrency_key``: the key made from the step's template and its task's values
(``context.customer_id=c-17``), NULL for a step without one; ``concurrency_limit``: how many
attempts with that key may run while this step starts. A step held back by its key waits in
state ``waiting`` until a slot of its key frees (duplex.storage.concurrency).

The partial indexes serve the claim's count of a key's running attempts and a key's held steps
(a step without a key costs them nothing), and the watchdog's look for keys holding steps back
(only held steps: not every keyed step ever run).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

_INDEX = "ix_workflow_steps_concurrency_key_state"
_KEYED = sa.text("concurrency_key IS NOT NULL")
_HELD_INDEX = "ix_workflow_steps_held_by_key"
_HELD = sa.text("state = 'waiting' AND concurrency_key IS NOT NULL")


def upgrade() -> None:
    op.add_column("workflow_steps", sa.Column("concurrency_key", sa.String(255), nullable=True))
    op.add_column("workflow_steps", sa.Column("concurrency_limit", sa.Integer(), nullable=True))
    op.create_index(
        _INDEX,
        "workflow_steps",
        ["concurrency_key", "state"],
        sqlite_where=_KEYED,
        postgresql_where=_KEYED,
    )
    op.create_index(
        _HELD_INDEX,
        "workflow_steps",
        ["concurrency_key"],
        sqlite_where=_HELD,
        postgresql_where=_HELD,
    )


def downgrade() -> None:
    op.drop_index(_HELD_INDEX, table_name="workflow_steps")
    op.drop_index(_INDEX, table_name="workflow_steps")
    op.drop_column("workflow_steps", "concurrency_limit")
    op.drop_column("workflow_steps", "concurrency_key")
