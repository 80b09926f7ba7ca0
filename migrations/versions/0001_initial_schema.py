"""Initial schema: tasks, steps, edges, transitions, domain events, workers, and the
``task_execution_status`` view.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the column types: a migration must not change when app code does.
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)
UUID = sa.String(36)

# Precedence matters (docs/architecture.md, Task execution status): with parallel execution a
# task can have a failed step and ready steps at once; it is blocked, not ready.
VIEW_SQL = """
CREATE VIEW task_execution_status AS
SELECT
    t.task_uuid AS task_uuid,
    COUNT(s.step_uuid) AS total_steps,
    COALESCE(SUM(CASE WHEN s.state = 'pending' THEN 1 ELSE 0 END), 0) AS pending_steps,
    COALESCE(SUM(CASE WHEN s.state = 'enqueued'
                        OR (s.state = 'waiting_for_retry' AND s.next_attempt_at <= {now})
                      THEN 1 ELSE 0 END), 0) AS ready_steps,
    COALESCE(SUM(CASE WHEN s.state = 'in_progress' THEN 1 ELSE 0 END), 0) AS in_progress_steps,
    COALESCE(SUM(CASE WHEN s.state = 'waiting_for_retry' THEN 1 ELSE 0 END), 0)
        AS waiting_for_retry_steps,
    COALESCE(SUM(CASE WHEN s.state = 'complete' THEN 1 ELSE 0 END), 0) AS complete_steps,
    COALESCE(SUM(CASE WHEN s.state = 'resolved_manually' THEN 1 ELSE 0 END), 0)
        AS resolved_steps,
    COALESCE(SUM(CASE WHEN s.state = 'error' THEN 1 ELSE 0 END), 0) AS error_steps,
    COALESCE(SUM(CASE WHEN s.state = 'cancelled' THEN 1 ELSE 0 END), 0) AS cancelled_steps,
    CASE
        WHEN SUM(CASE WHEN s.state = 'error' THEN 1 ELSE 0 END) > 0 THEN 'blocked_by_failures'
        WHEN SUM(CASE WHEN s.state = 'enqueued'
                        OR (s.state = 'waiting_for_retry' AND s.next_attempt_at <= {now})
                      THEN 1 ELSE 0 END) > 0 THEN 'has_ready_steps'
        WHEN SUM(CASE WHEN s.state = 'in_progress' THEN 1 ELSE 0 END) > 0 THEN 'processing'
        WHEN COUNT(s.step_uuid) > 0
         AND SUM(CASE WHEN s.state IN ('complete', 'resolved_manually') THEN 1 ELSE 0 END)
             = COUNT(s.step_uuid) THEN 'all_complete'
        ELSE 'waiting_for_dependencies'
    END AS execution_status
FROM tasks t
LEFT JOIN workflow_steps s ON s.task_uuid = t.task_uuid
GROUP BY t.task_uuid
"""

# SQLite keeps timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff' text in UTC; compare like with like.
NOW = {"sqlite": "strftime('%Y-%m-%d %H:%M:%f000', 'now')", "postgresql": "now()"}


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("task_uuid", UUID, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("namespace", sa.String(255), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("context", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("completed_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("task_uuid", name="pk_tasks"),
    )
    op.create_index("ix_tasks_namespace_state", "tasks", ["namespace", "state"])

    op.create_table(
        "workflow_steps",
        sa.Column("step_uuid", UUID, nullable=False),
        sa.Column("task_uuid", UUID, nullable=False),
        sa.Column("namespace", sa.String(255), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("handler", sa.String(255), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("retryable", sa.Boolean(), nullable=False),
        sa.Column("timeout_ms", sa.Integer(), nullable=True),
        sa.Column("inputs", JSON, nullable=False),
        sa.Column("declared_events", JSON, nullable=False),
        sa.Column("results", JSON, nullable=True),
        sa.Column("error", JSON, nullable=True),
        sa.Column("next_attempt_at", TS, nullable=True),
        sa.Column("claimed_by", sa.String(255), nullable=True),
        sa.Column("claimed_at", TS, nullable=True),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("completed_at", TS, nullable=True),
        sa.ForeignKeyConstraint(
            ["task_uuid"], ["tasks.task_uuid"], name="fk_workflow_steps_task_uuid_tasks"
        ),
        sa.PrimaryKeyConstraint("step_uuid", name="pk_workflow_steps"),
        sa.UniqueConstraint("task_uuid", "name", name="uq_workflow_steps_task_uuid_name"),
    )
    op.create_index(
        "ix_workflow_steps_state_namespace_next_attempt_at",
        "workflow_steps",
        ["state", "namespace", "next_attempt_at"],
    )
    op.create_index("ix_workflow_steps_task_uuid", "workflow_steps", ["task_uuid"])

    op.create_table(
        "workflow_step_edges",
        sa.Column("from_step_uuid", UUID, nullable=False),
        sa.Column("to_step_uuid", UUID, nullable=False),
        sa.ForeignKeyConstraint(
            ["from_step_uuid"],
            ["workflow_steps.step_uuid"],
            name="fk_workflow_step_edges_from_step_uuid_workflow_steps",
        ),
        sa.ForeignKeyConstraint(
            ["to_step_uuid"],
            ["workflow_steps.step_uuid"],
            name="fk_workflow_step_edges_to_step_uuid_workflow_steps",
        ),
        sa.PrimaryKeyConstraint("from_step_uuid", "to_step_uuid", name="pk_workflow_step_edges"),
    )
    op.create_index("ix_workflow_step_edges_to_step_uuid", "workflow_step_edges", ["to_step_uuid"])

    op.create_table(
        "workflow_step_transitions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("step_uuid", UUID, nullable=False),
        sa.Column("from_state", sa.String(32), nullable=True),
        sa.Column("to_state", sa.String(32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(255), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["step_uuid"],
            ["workflow_steps.step_uuid"],
            name="fk_workflow_step_transitions_step_uuid_workflow_steps",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_workflow_step_transitions"),
    )
    op.create_index(
        "ix_workflow_step_transitions_step_uuid", "workflow_step_transitions", ["step_uuid"]
    )

    op.create_table(
        "domain_events",
        sa.Column("event_id", UUID, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("task_uuid", UUID, nullable=False),
        sa.Column("step_uuid", UUID, nullable=True),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_domain_events"),
    )
    op.create_index("ix_domain_events_task_uuid", "domain_events", ["task_uuid"])
    op.create_index("ix_domain_events_created_at", "domain_events", ["created_at"])

    op.create_table(
        "workers",
        sa.Column("worker_id", sa.String(255), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.Column("stopped_at", TS, nullable=True),
        sa.Column("stats", JSON, nullable=False),
        sa.PrimaryKeyConstraint("worker_id", name="pk_workers"),
    )

    now = NOW[op.get_context().dialect.name]
    op.execute(VIEW_SQL.format(now=now))


def downgrade() -> None:
    op.execute("DROP VIEW task_execution_status")
    op.drop_table("workers")
    op.drop_table("domain_events")
    op.drop_table("workflow_step_transitions")
    op.drop_table("workflow_step_edges")
    op.drop_table("workflow_steps")
    op.drop_table("tasks")
