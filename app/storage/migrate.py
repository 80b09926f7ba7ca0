"""Schema migrations, run in code with a lock so workers starting together don't race.

The check that a database is at head, which every command makes, is ``duplex.storage.schema``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from duplex import migrations
from duplex.errors import SchemaNotReadyError
from duplex.storage.db import Database

# Any constant works; it only has to be the same in every Duplex process.
_ADVISORY_LOCK_KEY = 0x6475706C6578  # "duplex"


def alembic_config(connection: Connection | None = None) -> Config:
    """Return an Alembic config pointing at the bundled ``migrations`` package."""
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """Return the newest revision the code knows."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade_to_head(db: Database) -> tuple[str | None, str | None]:
    """Bring the schema to head inside one locked write transaction.

    Return the revision before (None: no schema yet) and after.
    """
    with db.write() as conn:
        # SQLite: db.write() already holds the write lock (BEGIN IMMEDIATE).
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
        before = MigrationContext.configure(conn).get_current_revision()
        refuse_unknown_revision(before)
        command.upgrade(alembic_config(conn), "head")
        after = MigrationContext.configure(conn).get_current_revision()
    return before, after


def refuse_unknown_revision(current: str | None) -> None:
    """Raise ``SchemaNotReadyError`` for a revision no migration script of this code has."""
    if current is None:
        return
    known = {
        script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()
    }
    if current not in known:
        raise SchemaNotReadyError(
            f"the database is at revision {current}, which this version of Duplex does not "
            "know (a newer Duplex migrated it): upgrade Duplex"
        )
