"""PostgreSQL: notify ``duplex_work`` only for steps still claimable when their transaction
commits.

The trigger of 0002 notified as soon as a step became ``enqueued``, even when the same
transaction then claimed it: a result's commit that claims its dependent (eager dispatch) woke
every worker's intake for nothing, once per hop of a chain (each woken intake then ran a claim
that found nothing; 10.3 ms per hop of a 1,600-step chain became 16.8 ms with LISTEN on). Now a
deferred constraint trigger runs at commit and reads the step's state then. Other backends
poll; this migration does nothing there.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

CLAIMABLE = "('enqueued', 'waiting_for_retry')"

FUNCTION = f"""
CREATE OR REPLACE FUNCTION duplex_notify_work() RETURNS trigger AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM workflow_steps
        WHERE step_uuid = NEW.step_uuid AND state IN {CLAIMABLE}
    ) THEN
        PERFORM pg_notify('duplex_work', NEW.namespace);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""

DEFERRED_TRIGGER = f"""
CREATE CONSTRAINT TRIGGER workflow_steps_notify_work
AFTER INSERT OR UPDATE OF state ON workflow_steps
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (NEW.state IN {CLAIMABLE})
EXECUTE FUNCTION duplex_notify_work()
"""

# 0002's function and trigger, for the downgrade.
OLD_FUNCTION = """
CREATE OR REPLACE FUNCTION duplex_notify_work() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('duplex_work', NEW.namespace);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""

OLD_TRIGGER = f"""
CREATE TRIGGER workflow_steps_notify_work
AFTER INSERT OR UPDATE OF state ON workflow_steps
FOR EACH ROW WHEN (NEW.state IN {CLAIMABLE})
EXECUTE FUNCTION duplex_notify_work()
"""


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER workflow_steps_notify_work ON workflow_steps")
    op.execute(FUNCTION)
    op.execute(DEFERRED_TRIGGER)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER workflow_steps_notify_work ON workflow_steps")
    op.execute(OLD_FUNCTION)
    op.execute(OLD_TRIGGER)
