"""``duplex schedule ...`` as a user runs it: each command, and bad input as one line that
writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.support import Duplex, assert_one_line_error, make_duplex
from tests.schedules.support import TEMPLATE_TOML


@pytest.fixture
def duplex(tmp_path: Path) -> Duplex:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "tick.toml").write_text(TEMPLATE_TOML)
    made = make_duplex(tmp_path / "work", templates_dir=templates)
    made.ok("migrate")
    return made


def schedules(duplex: Duplex) -> list[tuple[object, ...]]:
    return duplex.sql("SELECT name, paused FROM schedules ORDER BY name")


def test_add_list_show_pause_resume_remove(duplex: Duplex) -> None:
    out = duplex.ok(
        "schedule",
        "add",
        "nightly",
        "tick",
        "--cron",
        "30 2 * * *",
        "--timezone",
        "Europe/Berlin",
        "--context",
        '{"region": "eu"}',
        "--catchup",
        "1h",
    ).stdout
    assert out.startswith("schedule nightly: cron 30 2 * * * (Europe/Berlin) -> tick; next fire ")
    duplex.ok("schedule", "add", "often", "tick", "--every", "15m", "--overlap", "buffer_one")
    listing = duplex.ok("schedule", "list").stdout
    assert "nightly" in listing
    assert "every 15m" in listing
    assert "buffer_one" in listing
    shown = json.loads(duplex.ok("schedule", "show", "nightly", "--json").stdout)
    assert shown["context"] == {"region": "eu"}
    assert shown["catchup_ms"] == 3_600_000
    assert shown["fires"] == []
    assert "paused" in duplex.ok("schedule", "pause", "often").stdout
    assert schedules(duplex) == [("nightly", 0), ("often", 1)]
    assert "paused" in duplex.ok("schedule", "show", "often").stdout
    assert "resumed; next fire" in duplex.ok("schedule", "resume", "often").stdout
    duplex.ok("schedule", "add", "often", "tick", "--every", "1h", "--replace")
    assert json.loads(duplex.ok("schedule", "list", "--json").stdout)[1]["every_ms"] == 3_600_000
    duplex.ok("schedule", "remove", "often")
    assert schedules(duplex) == [("nightly", 0)]


BAD_INPUT = [
    (["--every", "2x"], ["not a duration: '2x'"]),
    (["--every", "10ms"], ["interval out of range"]),
    (["--cron", "61 * * * *"], ["invalid cron expression '61 * * * *'"]),
    (["--cron", "* * * * *", "--timezone", "Mars/Olympus"], ["unknown time zone"]),
    (["--every", "1s", "--catchup", "soon"], ["catchup", "not a duration"]),
    (["--every", "1s", "--context", "[1]"], ["invalid JSON context"]),
    (["--every", "1s", "--overlap", "cancel_previous"], ["invalid choice: 'cancel_previous'"]),
    (["--every", "1s", "--cron", "* * * * *"], ["not allowed with argument"]),
    ([], ["one of the arguments --cron --every is required"]),
]


def test_bad_input_is_one_line_and_writes_nothing(duplex: Duplex) -> None:
    for args, fragments in BAD_INPUT:
        result = duplex.run("schedule", "add", "bad", "tick", *args)
        assert_one_line_error(result, *fragments)
        assert schedules(duplex) == []


def test_unknown_names_and_a_taken_name_are_one_line(duplex: Duplex) -> None:
    assert_one_line_error(duplex.run("schedule", "add", "x", "nope", "--every", "1s"), "not found")
    duplex.ok("schedule", "add", "x", "tick", "--every", "1s")
    assert_one_line_error(
        duplex.run("schedule", "add", "x", "tick", "--every", "2s"), "already exists", "--replace"
    )
    for command in ("show", "pause", "resume", "remove"):
        assert_one_line_error(duplex.run("schedule", command, "nope"), "no such schedule: 'nope'")


def test_sync_adds_the_schedules_templates_declare(duplex: Duplex, tmp_path: Path) -> None:
    (tmp_path / "templates" / "tick.toml").write_text(
        TEMPLATE_TOML + '[[schedules]]\nname = "declared"\nevery = "1d"\n'
    )
    assert "1 added" in duplex.ok("schedule", "sync").stdout
    assert schedules(duplex) == [("declared", 0)]
    assert "1 unchanged" in duplex.ok("schedule", "sync").stdout
