"""Dynamic workflows: step kinds, checkpoints, batch items, signals, and the view's new states.

``workflow_steps.kind``: ``handler`` (every step before this revision), ``decision``,
``batch``, ``wait`` or ``sleep``; ``spec``: what the kind needs at run time (a decision's
branches, a batch's item step declaration, a wait's signal and timeout, a sleep's duration);
``checkpoint``: the state the last accepted ``ctx.checkpoint`` saved; ``item_index``: a batch
item's place in its batch (``NAME[i]``), so its convergence reads the results in order.

``ix_workflow_steps_waiting_until``: the wait and sleep steps that end by themselves (a sleep,
a wait with a ``timeout_ms``), by when; the sweep that ends them reads only these.

``step_signals``: every signal received (``duplex signal``), kept until a wait step uses it;
``signal_id`` is unique per task, so a signal sent twice acts once.

``task_execution_status`` counts ``skipped`` steps as done (``all_complete`` when every step
is complete, resolved or skipped) and ``waiting`` steps as neither ready nor blocking.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_VIEW_SQL = """
CREATE VIEW task_execution_status AS
SELECT
    t.task_uuid AS task_uuid,
    COUNT(s.step_uuid) AS total_steps,
    COALESCE(SUM(CASE WHEN s.state = 'pending' THEN 1 ELSE 0 END), 0) AS pending_steps,
    COALESCE(SUM(CASE WHEN {ready} THEN 1 ELSE 0 END), 0) AS ready_steps,
    COALESCE(SUM(CASE WHEN s.state = 'in_progress' THEN 1 ELSE 0 END), 0) AS in_progress_steps,
    COALESCE(SUM(CASE WHEN s.state = 'waiting_for_retry' THEN 1 ELSE 0 END), 0)
        AS waiting_for_retry_steps,
    COALESCE(SUM(CASE WHEN s.state = 'complete' THEN 1 ELSE 0 END), 0) AS complete_steps,
    COALESCE(SUM(CASE WHEN s.state = 'resolved_manually' THEN 1 ELSE 0 END), 0)
        AS resolved_steps,
    COALESCE(SUM(CASE WHEN s.state = 'error' THEN 1 ELSE 0 END), 0) AS error_steps,
    COALESCE(SUM(CASE WHEN s.state = 'cancelled' THEN 1 ELSE 0 END), 0) AS cancelled_steps,
    {new_columns}CASE
        WHEN t.state = 'cancelled' THEN 'cancelled'
        WHEN SUM(CASE WHEN s.state = 'error' THEN 1 ELSE 0 END) > 0 THEN 'blocked_by_failures'
        WHEN SUM(CASE WHEN {ready} THEN 1 ELSE 0 END) > 0 THEN 'has_ready_steps'
        WHEN SUM(CASE WHEN s.state = 'in_progress' THEN 1 ELSE 0 END) > 0 THEN 'processing'
        WHEN SUM(CASE WHEN s.state = 'enqueued' AND s.next_attempt_at > {now} THEN 1 ELSE 0 END)
             > 0 THEN 'scheduled'
        WHEN COUNT(s.step_uuid) > 0
         AND SUM(CASE WHEN s.state IN ({done}) THEN 1 ELSE 0 END)
             = COUNT(s.step_uuid) THEN 'all_complete'
        ELSE 'waiting_for_dependencies'
    END AS execution_status
FROM tasks t
LEFT JOIN workflow_steps s ON s.task_uuid = t.task_uuid
GROUP BY t.task_uuid, t.state
"""
_READY = (
    "(s.state = 'enqueued' AND (s.next_attempt_at IS NULL OR s.next_attempt_at <= {now}))"
    " OR (s.state = 'waiting_for_retry' AND s.next_attempt_at <= {now})"
)
_NEW_COLUMNS = """COALESCE(SUM(CASE WHEN s.state = 'skipped' THEN 1 ELSE 0 END), 0)
        AS skipped_steps,
    COALESCE(SUM(CASE WHEN s.state = 'waiting' THEN 1 ELSE 0 END), 0) AS waiting_steps,
    """

# Repeated in duplex.storage.models (WAITING_WITH_END): a migration does not import the code.
_WAITING_WITH_END = "state = 'waiting' AND next_attempt_at IS NOT NULL"

# SQLite keeps timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff' text in UTC; compare like with like.
_NOW = {"sqlite": "strftime('%Y-%m-%d %H:%M:%f000', 'now')", "postgresql": "now()"}


def _recreate_view(*, dynamic: bool) -> None:
    now = _NOW[op.get_context().dialect.name]
    done = "'complete', 'resolved_manually'" + (", 'skipped'" if dynamic else "")
    op.execute("DROP VIEW task_execution_status")
    op.execute(
        _VIEW_SQL.format(
            now=now,
            ready=_READY.format(now=now),
            done=done,
            new_columns=_NEW_COLUMNS if dynamic else "",
        )
    )


def upgrade() -> None:
    json_type = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    op.add_column(
        "workflow_steps",
        sa.Column("kind", sa.String(16), nullable=False, server_default="handler"),
    )
    op.add_column("workflow_steps", sa.Column("spec", json_type, nullable=True))
    op.add_column("workflow_steps", sa.Column("checkpoint", json_type, nullable=True))
    op.add_column("workflow_steps", sa.Column("item_index", sa.Integer(), nullable=True))
    op.create_index(
        "ix_workflow_steps_task_uuid_item_index", "workflow_steps", ["task_uuid", "item_index"]
    )
    # The wait sweep (duplex.storage.waits): the waits and sleeps that end by themselves.
    op.create_index(
        "ix_workflow_steps_waiting_until",
        "workflow_steps",
        ["state", "next_attempt_at"],
        sqlite_where=sa.text(_WAITING_WITH_END),
        postgresql_where=sa.text(_WAITING_WITH_END),
    )
    op.create_table(
        "step_signals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task_uuid", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("signal_id", sa.String(255), nullable=False),
        sa.Column("payload", json_type, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_by", sa.String(255), nullable=False),
        sa.Column("step_uuid", sa.String(36), nullable=True),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_step_signals"),
        sa.UniqueConstraint("task_uuid", "signal_id", name="uq_step_signals_task_uuid_signal_id"),
    )
    op.create_index("ix_step_signals_task_uuid_name", "step_signals", ["task_uuid", "name"])
    _recreate_view(dynamic=True)


def downgrade() -> None:
    _recreate_view(dynamic=False)
    op.drop_index("ix_step_signals_task_uuid_name", table_name="step_signals")
    op.drop_table("step_signals")
    op.drop_index("ix_workflow_steps_waiting_until", table_name="workflow_steps")
    op.drop_index("ix_workflow_steps_task_uuid_item_index", table_name="workflow_steps")
    for column in ("item_index", "checkpoint", "spec", "kind"):
        op.drop_column("workflow_steps", column)
