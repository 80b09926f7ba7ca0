"""``duplex migrate``: bring the database schema to head, and say in one line what it did."""

from __future__ import annotations

import argparse
from typing import Any

from duplex.cli.common import open_database
from duplex.settings import Settings


def add_commands(sub: Any) -> None:
    """Add ``migrate`` to the ``duplex`` parser."""
    migrate = sub.add_parser("migrate", help="bring the database schema to head")
    migrate.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    # Alembic is imported by the two commands that migrate, not by every command.
    from duplex.storage.migrate import upgrade_to_head

    with open_database(settings, check_schema=False) as db:
        before, after = upgrade_to_head(db)
    print(migration_summary(before, after))
    return 0


def migration_summary(before: str | None, after: str | None) -> str:
    """What ``duplex migrate`` did, in one line."""
    if before == after:
        return f"the database schema is already at {after} (head); nothing to do"
    if before is None:
        return f"created the database schema at {after} (head)"
    return f"upgraded the database schema from {before} to {after} (head)"
