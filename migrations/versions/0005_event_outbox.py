"""The outbox: a commit order for domain events, the relay's bookkeeping, operator actions.

* ``domain_events.sequence``: commit order within a task, from 1. Rows written before this
  migration are numbered by ``created_at`` and then insertion order (SQLite ``rowid``,
  PostgreSQL ``ctid``: the table was never updated, so that is the order of the inserts).
* ``published_at`` (set after the broker's confirm), ``publish_attempts``, ``publish_error``,
  ``retry_at``, ``dead_lettered_at``, ``skipped_at``: the relay's state of each event. Existing
  rows start unpublished, so a relay enabled later delivers the whole history, in order.
* ``domain_event_actions``: what ``duplex events retry/skip`` did, who, why.
(The NOTIFY on ``duplex_events`` is sent by the commit path itself,
``duplex.storage.listen.notify_new_events``: a row trigger would fire once per row of the
commit's executemany, not once per commit.)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from duplex.storage.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = UTCDateTime()
UNPUBLISHED = "published_at IS NULL AND skipped_at IS NULL"

BACKFILL = {
    "sqlite": """
        UPDATE domain_events SET sequence = s.n FROM (
            SELECT rowid AS r,
                   row_number() OVER (PARTITION BY task_uuid ORDER BY created_at, rowid) AS n
            FROM domain_events
        ) AS s WHERE s.r = domain_events.rowid
    """,
    "postgresql": """
        UPDATE domain_events AS d SET sequence = s.n FROM (
            SELECT ctid AS r,
                   row_number() OVER (PARTITION BY task_uuid ORDER BY created_at, ctid) AS n
            FROM domain_events
        ) AS s WHERE d.ctid = s.r
    """,
}


def upgrade() -> None:
    dialect = op.get_context().dialect.name
    op.add_column("domain_events", sa.Column("sequence", sa.Integer(), nullable=True))
    op.execute(BACKFILL[dialect])
    # SQLite cannot tighten a column in place; domain_events is read by no view, so the
    # batch's copy-and-rename is safe here.
    with op.batch_alter_table("domain_events") as batch:
        batch.alter_column("sequence", existing_type=sa.Integer(), nullable=False)
    for column in (
        sa.Column("published_at", TS, nullable=True),
        sa.Column("publish_attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("publish_error", sa.Text(), nullable=True),
        sa.Column("retry_at", TS, nullable=True),
        sa.Column("dead_lettered_at", TS, nullable=True),
        sa.Column("skipped_at", TS, nullable=True),
    ):
        op.add_column("domain_events", column)
    op.create_index(
        "ux_domain_events_task_uuid_sequence",
        "domain_events",
        ["task_uuid", "sequence"],
        unique=True,
    )
    op.create_index(
        "ix_domain_events_unpublished",
        "domain_events",
        ["task_uuid", "sequence"],
        sqlite_where=sa.text(UNPUBLISHED),
        postgresql_where=sa.text(UNPUBLISHED),
    )
    op.create_index("ix_domain_events_published_at", "domain_events", ["published_at"])
    op.create_table(
        "domain_event_actions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("operator", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_domain_event_actions"),
    )
    op.create_index("ix_domain_event_actions_event_id", "domain_event_actions", ["event_id"])


def downgrade() -> None:
    op.drop_index("ix_domain_event_actions_event_id", table_name="domain_event_actions")
    op.drop_table("domain_event_actions")
    op.drop_index("ix_domain_events_published_at", table_name="domain_events")
    op.drop_index("ix_domain_events_unpublished", table_name="domain_events")
    op.drop_index("ux_domain_events_task_uuid_sequence", table_name="domain_events")
    with op.batch_alter_table("domain_events") as batch:
        for name in (
            "skipped_at",
            "dead_lettered_at",
            "retry_at",
            "publish_error",
            "publish_attempts",
            "published_at",
            "sequence",
        ):
            batch.drop_column(name)
