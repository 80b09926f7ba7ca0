"""Is the database at the schema this code expects? Answered without loading Alembic.

Every command and every ``Client`` asks before touching the tables, so the answer has to be
cheap for a short-lived process: importing Alembic costs one about 0.1 s. Only ``duplex
migrate`` (``duplex.storage.migrate``) needs Alembic itself.
"""

from __future__ import annotations

from sqlalchemy import inspect, text

from duplex.errors import SchemaNotReadyError
from duplex.storage.db import Database

# The newest script in migrations/versions; tests/storage/test_migrations.py checks that they agree.
HEAD_REVISION = "0019"


def current_revision(db: Database) -> str | None:
    """Return the revision the database is at, or None when it has never been migrated."""
    with db.read() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        revisions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(revisions) > 1:  # Duplex's history has no branches: Alembic did not write this
        raise SchemaNotReadyError(
            f"the database records several schema revisions ({', '.join(revisions)}) in "
            "alembic_version; Duplex's migrations have one line of history: keep one row"
        )
    return revisions[0] if revisions else None


def ensure_schema_ready(db: Database) -> None:
    """Raise ``SchemaNotReadyError`` unless the database is at ``HEAD_REVISION``."""
    current = current_revision(db)
    if current == HEAD_REVISION:
        return
    if current is not None:
        # Only on the way to an error: is it behind, or ahead of this code?
        from duplex.storage.migrate import refuse_unknown_revision

        refuse_unknown_revision(current)
    state = "has no Duplex schema" if current is None else f"is at revision {current}"
    raise SchemaNotReadyError(
        f"the database {state}, the code expects {HEAD_REVISION}: run `duplex migrate`"
    )
