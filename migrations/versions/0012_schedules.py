"""Schedules: ``schedules`` (what fires when) and ``schedule_fires`` (what each fire did).

* ``schedules``: one row per schedule: the template (its validated definition, so any worker
  can fire it without the file), the task context, a cron expression (read in ``timezone``)
  or an interval in ms, the overlap policy, the catch-up window, paused or not, the next
  fire time (the firers' work list: index on ``paused, next_fire_at``), the fire held back
  by ``buffer_one``, the last fire and its task, and the template that declared it (NULL for
  schedules added by ``duplex schedule add`` or the ``Client``).
* ``schedule_fires``: one row per fire time acted on: ``fired`` (with its task), ``skipped``
  (overlap), or ``missed`` (later than the catch-up window; one row stands for ``fires``
  consecutive fire times). Unique on (schedule_name, fire_at): a fire time is recorded once.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from duplex.storage.models import UTCDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

TS = UTCDateTime()
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("template_name", sa.String(255), nullable=False),
        sa.Column("template", JSON, nullable=False),
        sa.Column("context", JSON, nullable=False),
        sa.Column("cron", sa.String(255), nullable=True),
        sa.Column("every_ms", sa.BigInteger(), nullable=True),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("overlap", sa.String(16), nullable=False),
        sa.Column("catchup_ms", sa.BigInteger(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("next_fire_at", TS, nullable=False),
        sa.Column("buffered_fire_at", TS, nullable=True),
        sa.Column("last_fire_at", TS, nullable=True),
        sa.Column("last_task_uuid", sa.String(36), nullable=True),
        sa.Column("declared_in", sa.String(255), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_schedules"),
    )
    op.create_index("ix_schedules_paused_next_fire_at", "schedules", ["paused", "next_fire_at"])
    op.create_table(
        "schedule_fires",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("schedule_name", sa.String(200), nullable=False),
        sa.Column("fire_at", TS, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("fires", sa.Integer(), nullable=False),
        sa.Column("task_uuid", sa.String(36), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("worker_id", sa.String(255), nullable=True),
        sa.Column("recorded_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_schedule_fires"),
        sa.UniqueConstraint(
            "schedule_name", "fire_at", name="uq_schedule_fires_schedule_name_fire_at"
        ),
    )


def downgrade() -> None:
    op.drop_table("schedule_fires")
    op.drop_index("ix_schedules_paused_next_fire_at", table_name="schedules")
    op.drop_table("schedules")
