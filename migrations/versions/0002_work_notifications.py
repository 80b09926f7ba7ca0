"""PostgreSQL: NOTIFY ``duplex_work`` whenever a step becomes claimable.

Event-driven intake LISTENs on the channel. Notifications are sent at commit, and PostgreSQL
folds identical ones within a transaction, so a 1000-step submission wakes each worker once.
Other backends poll; this migration does nothing there.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

FUNCTION = """
CREATE FUNCTION duplex_notify_work() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('duplex_work', NEW.namespace);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""

TRIGGER = """
CREATE TRIGGER workflow_steps_notify_work
AFTER INSERT OR UPDATE OF state ON workflow_steps
FOR EACH ROW WHEN (NEW.state IN ('enqueued', 'waiting_for_retry'))
EXECUTE FUNCTION duplex_notify_work()
"""


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute(FUNCTION)
    op.execute(TRIGGER)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER workflow_steps_notify_work ON workflow_steps")
    op.execute("DROP FUNCTION duplex_notify_work()")
