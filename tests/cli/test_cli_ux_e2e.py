"""What a new user meets first, through the ``duplex`` CLI in real subprocesses: what
``migrate`` says it did, ``--settings`` before or after the command, the hint that
``status`` lists only the newest tasks, and the settings errors' wording.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from alembic import command

from duplex.client import Client
from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.migrate import alembic_config
from duplex.storage.schema import HEAD_REVISION
from tests.cli.support import TEMPLATES, Duplex, assert_one_line_error, make_duplex

pytestmark = pytest.mark.e2e


def test_migrate_says_what_it_did(tmp_path: Path) -> None:
    duplex = make_duplex(tmp_path)
    created = duplex.ok("migrate").stdout.strip()
    assert created == f"created the database schema at {HEAD_REVISION} (head)"
    again = duplex.ok("migrate").stdout.strip()
    assert again == f"the database schema is already at {HEAD_REVISION} (head); nothing to do"

    db = Database(DatabaseSettings(url=f"sqlite:///{duplex.db_path}"))
    try:
        with db.write() as conn:
            command.downgrade(alembic_config(conn), "0005")
    finally:
        db.dispose()
    upgraded = duplex.ok("migrate").stdout.strip()
    assert upgraded == f"upgraded the database schema from 0005 to {HEAD_REVISION} (head)"


def elsewhere(duplex: Duplex) -> Path:
    """A second settings file naming another database; the working directory's stays."""
    other = duplex.cwd / "elsewhere"
    other.mkdir()
    text = (duplex.cwd / "settings.toml").read_text()
    path = other / "other.toml"
    path.write_text(text.replace(str(duplex.db_path), str(other / "other.db")))
    return path


def test_settings_is_accepted_before_and_after_the_command(tmp_path: Path) -> None:
    duplex = make_duplex(tmp_path)
    other = elsewhere(duplex)
    assert "created" in duplex.ok("migrate", "--settings", str(other)).stdout
    assert (other.parent / "other.db").exists()
    assert not duplex.db_path.exists()  # the working directory's settings were not used
    assert "already" in duplex.ok("--settings", str(other), "migrate").stdout
    # Given in both places, the one after the command wins, as a repeated option does.
    missing = str(tmp_path / "missing.toml")
    assert "already" in duplex.ok("--settings", missing, "migrate", "--settings", str(other)).stdout
    result = duplex.run("status", "--settings", missing)
    assert_one_line_error(result, "settings file not found", missing)
    assert "--settings FILE" in duplex.ok("submit", "--help").stdout


def test_status_says_when_it_lists_only_the_newest_tasks(tmp_path: Path) -> None:
    duplex = make_duplex(tmp_path)
    duplex.ok("migrate")
    with Client(f"sqlite:///{duplex.db_path}") as client:
        client.submit_many(TEMPLATES / "diamond.toml", [{}, {}, {}])

    cut = duplex.ok("status", "--limit", "2").stdout
    assert "the newest 2 of 3 tasks; `--limit 3` lists them all" in cut
    whole = duplex.ok("status", "--limit", "3").stdout
    assert "newest" not in whole
    assert len([line for line in whole.splitlines() if "e2e_diamond" in line]) == 3

    as_json = json.loads(duplex.ok("status", "--limit", "2", "--json").stdout)
    assert len(as_json["tasks"]) == 2
    assert as_json["total_tasks"] == 3
