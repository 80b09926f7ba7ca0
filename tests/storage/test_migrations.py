"""The Alembic migrations produce exactly the schema of duplex.storage.models, on both backends."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from duplex.clock import utcnow
from duplex.errors import SchemaNotReadyError, StorageError
from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.migrate import alembic_config, head_revision, upgrade_to_head
from duplex.storage.models import metadata
from duplex.storage.schema import HEAD_REVISION, current_revision, ensure_schema_ready
from duplex.storage.submission import create_task
from duplex.templates import parse_template
from tests import processes
from tests.conftest import (
    create_postgres_schema,
    drop_postgres_schema,
    postgres_schema_url,
    require_postgres,
)

TABLES = {
    "tasks",
    "workflow_steps",
    "workflow_step_edges",
    "workflow_step_transitions",
    "domain_events",
    "workers",
}
# docs/architecture.md, The SQL users query: the columns users may query.
VIEW_COLUMNS = {
    "task_uuid",
    "total_steps",
    "pending_steps",
    "ready_steps",
    "in_progress_steps",
    "complete_steps",
    "error_steps",
    "execution_status",
}


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A database (SQLite file, or a fresh PostgreSQL schema) that was never migrated."""
    if request.param == "sqlite":
        database = Database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'empty.db'}"))
        try:
            yield database
        finally:
            database.dispose()
        return
    require_postgres()
    schema = create_postgres_schema()
    database = Database(DatabaseSettings(url=postgres_schema_url(schema)))
    try:
        yield database
    finally:
        database.dispose()
        drop_postgres_schema(schema)


def schema_differences(db: Database) -> list[object]:
    with db.read() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, metadata))


def table_names(db: Database) -> set[str]:
    with db.read() as conn:
        return set(inspect(conn).get_table_names())


def view_names(db: Database) -> set[str]:
    with db.read() as conn:
        return set(inspect(conn).get_view_names())


def downgrade_to_base(db: Database) -> None:
    with db.write() as conn:
        command.downgrade(alembic_config(conn), "base")


def test_migrations_match_the_models(db: Database) -> None:
    assert schema_differences(db) == []
    assert table_names(db) >= TABLES


def test_the_comparison_notices_a_drifted_schema(db: Database) -> None:
    # Guard against a vacuous comparison: a missing index must show up.
    with db.write() as conn:
        conn.execute(text("DROP INDEX ix_domain_events_created_at"))
    differences = schema_differences(db)
    assert len(differences) == 1
    assert "ix_domain_events_created_at" in repr(differences)


def test_the_schema_is_at_head_after_upgrade(db: Database) -> None:
    assert head_revision() is not None
    assert current_revision(db) == head_revision()
    ensure_schema_ready(db)


def test_the_view_has_the_documented_columns(db: Database) -> None:
    assert "task_execution_status" in view_names(db)
    with db.read() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("task_execution_status")}
    assert columns >= VIEW_COLUMNS


def test_the_view_answers_for_a_task(db: Database) -> None:
    template = parse_template('name = "t"\n[[steps]]\nname = "a"\nhandler = "h"\n')
    with db.write() as conn:
        task = create_task(conn, template, {}, now=utcnow())
    with db.read() as conn:
        row = conn.execute(
            text("SELECT * FROM task_execution_status WHERE task_uuid = :t"), {"t": task}
        ).one()
    assert row.task_uuid == task
    assert (row.total_steps, row.pending_steps, row.ready_steps, row.complete_steps) == (1, 0, 1, 0)
    assert (row.in_progress_steps, row.error_steps) == (0, 0)
    assert row.execution_status == "has_ready_steps"


def test_upgrade_twice_is_a_no_op(db: Database) -> None:
    upgrade_to_head(db)
    assert current_revision(db) == head_revision()
    assert schema_differences(db) == []


def test_downgrade_to_base_and_upgrade_again(db: Database) -> None:
    downgrade_to_base(db)
    assert current_revision(db) is None
    assert not (TABLES & table_names(db))
    assert "task_execution_status" not in view_names(db)
    with pytest.raises(SchemaNotReadyError):
        ensure_schema_ready(db)

    upgrade_to_head(db)
    assert current_revision(db) == head_revision()
    assert schema_differences(db) == []
    assert "task_execution_status" in view_names(db)
    ensure_schema_ready(db)


def test_ensure_schema_ready_on_an_empty_database(empty_db: Database) -> None:
    with pytest.raises(SchemaNotReadyError) as info:
        ensure_schema_ready(empty_db)
    message = str(info.value)
    assert "duplex migrate" in message
    assert "no Duplex schema" in message
    assert isinstance(info.value, StorageError)


def test_upgrade_an_empty_database(empty_db: Database) -> None:
    assert current_revision(empty_db) is None
    upgrade_to_head(empty_db)
    assert schema_differences(empty_db) == []
    ensure_schema_ready(empty_db)


def test_the_head_revision_constant_names_the_newest_script() -> None:
    # duplex.storage.schema answers "is the database at head?" without Alembic, from this
    # constant: a new migration script must move it too.
    assert head_revision() == HEAD_REVISION


def test_a_database_behind_the_code_is_told_to_migrate(db: Database) -> None:
    with db.write() as conn:
        command.downgrade(alembic_config(conn), "0006")
    assert current_revision(db) == "0006"
    with pytest.raises(SchemaNotReadyError) as info:
        ensure_schema_ready(db)
    assert str(info.value) == (
        f"the database is at revision 0006, the code expects {HEAD_REVISION}: run `duplex migrate`"
    )


def test_a_database_ahead_of_the_code_is_told_to_upgrade_duplex(db: Database) -> None:
    with db.write() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaNotReadyError, match="revision 9999, which this version of Duplex"):
        ensure_schema_ready(db)


def test_several_recorded_revisions_are_refused(db: Database) -> None:
    with db.write() as conn:
        conn.execute(text("INSERT INTO alembic_version (version_num) VALUES ('0006')"))
    with pytest.raises(SchemaNotReadyError, match="several schema revisions"):
        ensure_schema_ready(db)


def test_submitting_work_does_not_load_alembic(tmp_path: Path) -> None:
    # Importing Alembic costs a short-lived process (a web request's submit, `duplex submit`)
    # about 0.1 s; only the commands that migrate need it.
    url = f"sqlite:///{tmp_path / 'duplex.db'}"
    migrated = Database(DatabaseSettings(url=url))
    upgrade_to_head(migrated)
    migrated.dispose()
    script = (
        "import sys\n"
        "import duplex.cli.main\n"
        "from duplex import Client\n"
        "with Client(sys.argv[1]) as client:\n"
        "    client.submit(duplex.templates.parse_template(sys.argv[2]))\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'alembic'))\n"
    )
    template = 'name = "t"\n[[steps]]\nname = "a"\nhandler = "h"\n'
    done = processes.run(
        [sys.executable, "-c", script, url, template],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
