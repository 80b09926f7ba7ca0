"""The orchestration tables, as SQLAlchemy Core.

Migrations in ``migrations/`` create this schema; ``tests/storage/test_migrations.py`` proves
the two agree. UUIDs are canonical text on every backend; timestamps are stored in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        # SQLite compares timestamps as text, so every value must have one shape.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def unindexed(column: ColumnElement[str]) -> ColumnElement[str]:
    """Return ``column || ''``: the same value, but not something an index can serve.

    For guards on rows already found by primary key: without statistics SQLite would rather
    scan the (state, ...) index than look the keys up.
    """
    return column.concat("")


JSONValue = JSON().with_variant(JSONB(), "postgresql")
UUIDText = String(36)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# The rows of the rate limits' partial index.
RATE_LIMITED = "rate_limit IS NOT NULL"

# The rows of the concurrency keys' partial indexes.
KEYED = "concurrency_key IS NOT NULL"
HELD_BY_KEY = "state = 'waiting' AND concurrency_key IS NOT NULL"

# The rows of the batch items' partial index.
BATCH_ITEMS = "item_index IS NOT NULL"

# The rows of the deadline sweep's partial index; its query repeats this text, so that both
# databases see that the index serves it (the states are written in, not bound).
OPEN_WITH_DEADLINE = "deadline_at IS NOT NULL AND state IN ('pending', 'in_progress')"
# The steps the wait sweep looks at: waiting, and ending by themselves (migration 0014).
WAITING_WITH_END = "state = 'waiting' AND next_attempt_at IS NOT NULL"

tasks = Table(
    "tasks",
    metadata,
    Column("task_uuid", UUIDText, primary_key=True),
    Column("name", String(255), nullable=False),
    Column("namespace", String(255), nullable=False),
    Column("version", String(64), nullable=False),
    Column("state", String(32), nullable=False),
    Column("context", JSONValue, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("completed_at", UTCDateTime),
    # Set by a submitter that may retry: unique per template name (see Client.submit).
    Column("idempotency_key", String(255)),
    # The W3C trace context given at submit (a carrier dict), continued by every step.
    Column("trace_context", JSONValue),
    # When the task must be finished (``max_duration``); NULL: no deadline (migration 0011).
    Column("deadline_at", UTCDateTime),
    Index(None, "namespace", "state"),
    # The dashboard's task list: newest first, keyset-paginated on (created_at, task_uuid).
    Index(None, "created_at", "task_uuid"),
    # The dashboard's state filter, and its status counts of the tasks not yet complete.
    Index(None, "state", "created_at"),
    Index("ux_tasks_name_idempotency_key", "name", "idempotency_key", unique=True),
    # The deadline sweep: only unfinished tasks that have a deadline (duplex.storage.deadlines).
    Index(
        "ix_tasks_open_deadline",
        "deadline_at",
        sqlite_where=text(OPEN_WITH_DEADLINE),
        postgresql_where=text(OPEN_WITH_DEADLINE),
    ),
)

workflow_steps = Table(
    "workflow_steps",
    metadata,
    Column("step_uuid", UUIDText, primary_key=True),
    Column("task_uuid", UUIDText, ForeignKey("tasks.task_uuid"), nullable=False),
    Column("namespace", String(255), nullable=False),
    Column("name", String(255), nullable=False),
    Column("handler", String(255), nullable=False),
    Column("position", Integer, nullable=False),
    Column("state", String(32), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("retryable", Boolean, nullable=False),
    Column("timeout_ms", Integer),
    Column("inputs", JSONValue, nullable=False),
    Column("declared_events", JSONValue, nullable=False),
    Column("results", JSONValue),
    Column("error", JSONValue),
    Column("next_attempt_at", UTCDateTime),
    Column("claimed_by", String(255)),
    Column("claimed_at", UTCDateTime),
    Column("started_at", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("completed_at", UTCDateTime),
    # Higher is claimed first, with aging (docs/time.md, Priority); set at submission.
    Column("priority", Integer, nullable=False, default=0, server_default="0"),
    # The step's ``[steps.retry]`` (the fields it overrides), NULL: none (migration 0011).
    Column("retry_policy", JSONValue),
    # Dynamic workflows (docs/workflows.md, migration 0014): the step's kind (handler,
    # decision, batch, wait, sleep) and what that kind needs at run time; the state the last
    # accepted ``ctx.checkpoint`` saved; a batch item's place in its batch.
    Column("kind", String(16), nullable=False, default="handler", server_default="handler"),
    Column("spec", JSONValue),
    Column("checkpoint", JSONValue),
    Column("item_index", Integer),
    # When ``duplex cancel --step`` asked this step's running attempt to stop (migration 0015);
    # its worker's sweep finds it (duplex.storage.cancels). Cleared by ``duplex retry``.
    Column("cancel_requested_at", UTCDateTime),
    # Concurrency keys (docs/flow-control.md, migration 0017): the step's key, and how many
    # attempts with it may run while this one starts; NULL: none.
    Column("concurrency_key", String(255)),
    Column("concurrency_limit", Integer),
    # Rate limits (docs/flow-control.md, migration 0018): the limit each start takes tokens
    # of, and how many.
    Column("rate_limit", String(255)),
    Column("rate_units", Integer),
    UniqueConstraint("task_uuid", "name"),
    # The claim query: per priority level, the steps of a namespace due by now, oldest first
    # (``next_attempt_at`` is the not-before time: ready since, due at, scheduled for).
    Index(None, "state", "namespace", "priority", "next_attempt_at"),
    # Task state probes (which states does a task have?) and per-task listings.
    Index(None, "task_uuid", "state"),
    # A convergence reads its batch's items in order, page by page (``ctx.batch_results``).
    # Items only (migration 0016): other steps cost it nothing.
    Index(
        None,
        "task_uuid",
        "item_index",
        sqlite_where=text(BATCH_ITEMS),
        postgresql_where=text(BATCH_ITEMS),
    ),
    # A key's running attempts (the claim counts them) and the steps it holds back; the keys
    # that hold any back (the sweep looks every second).
    Index(
        "ix_workflow_steps_concurrency_key_state",
        "concurrency_key",
        "state",
        sqlite_where=text(KEYED),
        postgresql_where=text(KEYED),
    ),
    Index(
        "ix_workflow_steps_held_by_key",
        "concurrency_key",
        sqlite_where=text(HELD_BY_KEY),
        postgresql_where=text(HELD_BY_KEY),
    ),
    # When the next step waiting for a rate limit's tokens is due (duplex.storage.rate_limits).
    Index(
        "ix_workflow_steps_rate_limit_waiting",
        "rate_limit",
        "state",
        "next_attempt_at",
        sqlite_where=text(RATE_LIMITED),
        postgresql_where=text(RATE_LIMITED),
    ),
    # The wait sweep: only waits and sleeps that end by themselves (duplex.storage.waits).
    # ``state`` first, though constant here: else SQLite, without statistics, prefers the
    # claim index for ``state = 'waiting'`` and sorts.
    Index(
        "ix_workflow_steps_waiting_until",
        "state",
        "next_attempt_at",
        sqlite_where=text(WAITING_WITH_END),
        postgresql_where=text(WAITING_WITH_END),
    ),
)

workflow_step_edges = Table(
    "workflow_step_edges",
    metadata,
    Column("from_step_uuid", UUIDText, ForeignKey("workflow_steps.step_uuid"), primary_key=True),
    Column("to_step_uuid", UUIDText, ForeignKey("workflow_steps.step_uuid"), primary_key=True),
    Index(None, "to_step_uuid"),
)

workflow_step_transitions = Table(
    "workflow_step_transitions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("step_uuid", UUIDText, ForeignKey("workflow_steps.step_uuid"), nullable=False),
    Column("from_state", String(32)),
    Column("to_state", String(32), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("worker_id", String(255)),
    Column("reason", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "step_uuid"),
)

domain_events = Table(
    "domain_events",
    metadata,
    Column("event_id", UUIDText, primary_key=True),
    Column("name", String(255), nullable=False),
    Column("task_uuid", UUIDText, nullable=False),
    Column("step_uuid", UUIDText),
    Column("payload", JSONValue, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # Commit order within the task, from 1: assigned under the task lock (outbox.py).
    Column("sequence", Integer, nullable=False),
    # Set by the relay only after the broker confirmed the message.
    Column("published_at", UTCDateTime),
    # Failed publications of this event (a nack, an unroutable return in "retry" mode), the
    # last one's error, and when the next try may happen.
    Column("publish_attempts", Integer, nullable=False, default=0, server_default="0"),
    Column("publish_error", Text),
    Column("retry_at", UTCDateTime),
    # After relay.max_attempts failures: the task's later events wait behind it.
    Column("dead_lettered_at", UTCDateTime),
    # Settled by hand (``duplex events skip``): never published, no longer blocking.
    Column("skipped_at", UTCDateTime),
    Index(None, "task_uuid"),
    Index(None, "created_at"),
    Index("ux_domain_events_task_uuid_sequence", "task_uuid", "sequence", unique=True),
    # The relay's work list: only the events still to publish, so its probes cost nothing
    # for the history. Skipped and published rows leave it.
    Index(
        "ix_domain_events_unpublished",
        "task_uuid",
        "sequence",
        sqlite_where=text("published_at IS NULL AND skipped_at IS NULL"),
        postgresql_where=text("published_at IS NULL AND skipped_at IS NULL"),
    ),
    Index(None, "published_at"),
)

# What operators did to events (``duplex events retry/skip``): who, what, why.
domain_event_actions = Table(
    "domain_event_actions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", UUIDText, nullable=False),
    Column("action", String(32), nullable=False),
    Column("operator", String(255), nullable=False),
    Column("reason", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "event_id"),
)

workers = Table(
    "workers",
    metadata,
    Column("worker_id", String(255), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
    Column("stopped_at", UTCDateTime),
    Column("stats", JSONValue, nullable=False),
    # Where the worker takes local wake-ups (duplex.intake.wake): SQLite workers only.
    Column("wake_address", String(255)),
)

# Schedules (docs/time.md, Schedules): what fires when, and what each fire time did.
schedules = Table(
    "schedules",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("template_name", String(255), nullable=False),
    # The validated template, so that any worker fires it without the file.
    Column("template", JSONValue, nullable=False),
    Column("context", JSONValue, nullable=False),
    Column("cron", String(255)),
    Column("every_ms", BigInteger),
    Column("timezone", String(64), nullable=False),
    Column("overlap", String(16), nullable=False),
    Column("catchup_ms", BigInteger, nullable=False),
    Column("paused", Boolean, nullable=False),
    # The firers' work list.
    Column("next_fire_at", UTCDateTime, nullable=False),
    # buffer_one: the fire time held back until the previous run ends.
    Column("buffered_fire_at", UTCDateTime),
    Column("last_fire_at", UTCDateTime),
    Column("last_task_uuid", UUIDText),
    # The template that declares it ([[schedules]]); NULL when added by hand.
    Column("declared_in", String(255)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index(None, "paused", "next_fire_at"),
)

schedule_fires = Table(
    "schedule_fires",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("schedule_name", String(200), nullable=False),
    Column("fire_at", UTCDateTime, nullable=False),
    Column("outcome", String(16), nullable=False),  # fired | skipped | missed
    Column("fires", Integer, nullable=False),  # fire times the row stands for (missed: N)
    Column("task_uuid", UUIDText),
    Column("detail", Text),
    Column("worker_id", String(255)),
    Column("recorded_at", UTCDateTime, nullable=False),
    # A fire time is recorded once, whoever races for it.
    UniqueConstraint("schedule_name", "fire_at"),
)

Row = dict[str, Any]

# Paused namespaces and templates (``duplex pause``): no step of theirs is claimed while its
# row exists; steps already running finish. Read by every claim (``duplex.storage.pauses``).
pauses = Table(
    "pauses",
    metadata,
    Column("kind", String(16), primary_key=True),  # "namespace" or "template"
    Column("name", String(255), primary_key=True),
    Column("reason", Text),
    Column("paused_by", String(255), nullable=False),
    Column("paused_at", UTCDateTime, nullable=False),
)

# Named rate limits (``duplex limits set``, docs/flow-control.md): ``limit`` units per
# ``period_ms``, ``burst`` more at once; ``tat`` is the whole state of the bucket (NULL: full).
rate_limits = Table(
    "rate_limits",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("limit", Integer, nullable=False),
    Column("period_ms", BigInteger, nullable=False),
    Column("burst", Integer, nullable=False, default=0, server_default="0"),
    Column("tat", UTCDateTime),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("updated_by", String(255)),
)

# Signals sent to tasks (``duplex signal``): kept until the wait step they name uses them
# (``step_uuid``, ``used_at``); a ``signal_id`` acts once per task (docs/workflows.md).
step_signals = Table(
    "step_signals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task_uuid", UUIDText, nullable=False),
    Column("name", String(255), nullable=False),
    Column("signal_id", String(255), nullable=False),
    Column("payload", JSONValue, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    Column("sent_by", String(255), nullable=False),
    Column("step_uuid", UUIDText),
    Column("used_at", UTCDateTime),
    UniqueConstraint("task_uuid", "signal_id"),
    Index(None, "task_uuid", "name"),
)
