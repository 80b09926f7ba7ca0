"""``duplex schedule ...`` as a user runs it: each command, and bad input as one line that
writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from duplex.cli.main import main
from tests.cli.support import Duplex, make_duplex
from tests.schedules.support import TEMPLATE_TOML


@pytest.fixture(autouse=True)
def keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """``main`` run in this process must not reconfigure the test process's logging."""
    monkeypatch.setattr("duplex.cli.main.configure_logging", lambda _settings: None)


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


def test_add_list_show_pause_resume_remove(
    duplex: Duplex, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first as a real process (the console script), the rest in this process (fast).
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
    monkeypatch.chdir(duplex.cwd)

    def ok(*args: str) -> str:
        assert main(["--settings", str(duplex.cwd / "settings.toml"), *args]) == 0
        return capsys.readouterr().out

    ok("schedule", "add", "often", "tick", "--every", "15m", "--overlap", "buffer_one")
    listing = ok("schedule", "list")
    assert "nightly" in listing
    assert "every 15m" in listing
    assert "buffer_one" in listing
    shown = json.loads(ok("schedule", "show", "nightly", "--json"))
    assert shown["context"] == {"region": "eu"}
    assert shown["catchup_ms"] == 3_600_000
    assert shown["fires"] == []
    assert "paused" in ok("schedule", "pause", "often")
    assert schedules(duplex) == [("nightly", 0), ("often", 1)]
    assert "paused" in ok("schedule", "show", "often")
    assert "resumed; next fire" in ok("schedule", "resume", "often")
    ok("schedule", "add", "often", "tick", "--every", "1h", "--replace")
    assert json.loads(ok("schedule", "list", "--json"))[1]["every_ms"] == 3_600_000
    ok("schedule", "remove", "often")
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


def in_process(duplex: Duplex, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run ``duplex ARGS`` in this process (fast); assert one-line failure; return the line."""
    try:
        code = main(["--settings", str(duplex.cwd / "settings.toml"), *args])
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(
    duplex: Duplex, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(duplex.cwd)
    for args, fragments in BAD_INPUT:
        line = in_process(duplex, capsys, "schedule", "add", "bad", "tick", *args)
        for fragment in fragments:
            assert fragment in line, (args, line)
        assert schedules(duplex) == []
    assert "not found" in in_process(
        duplex, capsys, "schedule", "add", "x", "nope", "--every", "1s"
    )
    duplex.ok("schedule", "add", "x", "tick", "--every", "1s")
    taken = in_process(duplex, capsys, "schedule", "add", "x", "tick", "--every", "2s")
    assert "already exists" in taken
    assert "--replace" in taken
    for command in ("show", "pause", "resume", "remove"):
        line = in_process(duplex, capsys, "schedule", command, "nope")
        assert "no such schedule: 'nope'" in line


def test_sync_adds_the_schedules_templates_declare(duplex: Duplex, tmp_path: Path) -> None:
    (tmp_path / "templates" / "tick.toml").write_text(
        TEMPLATE_TOML + '[[schedules]]\nname = "declared"\nevery = "1d"\n'
    )
    assert "1 added" in duplex.ok("schedule", "sync").stdout
    assert schedules(duplex) == [("declared", 0)]
    assert "1 unchanged" in duplex.ok("schedule", "sync").stdout
