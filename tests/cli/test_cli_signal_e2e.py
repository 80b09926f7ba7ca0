"""``duplex signal`` and ``duplex complete`` as a user runs them: the two commands once each as
real processes, then the repeats and bad input in this process (fast), each one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from duplex.cli.common import EXIT_ERROR, EXIT_USAGE
from duplex.cli.main import main
from duplex.client import Client
from tests.cli.support import Duplex, make_duplex
from tests.conftest import sqlite_database

# A root wait step: waiting from the submission on.
APPROVE = """
name = "approve"
[[steps]]
name = "approval"
kind = "wait"
signal = "approved"
[[steps]]
name = "ship"
handler = "t.h"
depends_on = ["approval"]
[[steps]]
name = "label"
handler = "t.h"
depends_on = ["ship"]
"""


@pytest.fixture(autouse=True)
def keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """``main`` run in this process must not reconfigure the test process's logging."""
    monkeypatch.setattr("duplex.cli.main.configure_logging", lambda _settings: None)


@pytest.fixture
def duplex(tmp_path: Path) -> Duplex:
    made = make_duplex(tmp_path / "work")
    sqlite_database(made.db_path).dispose()  # migrated in this process: one process less
    return made


def step(duplex: Duplex, task: str, name: str) -> tuple[str, str, object]:
    ((step_uuid, state, results),) = duplex.sql(
        "SELECT step_uuid, state, results FROM workflow_steps WHERE task_uuid = ? AND name = ?",
        [task, name],
    )
    return str(step_uuid), str(state), None if results is None else json.loads(results)


def test_signal_and_complete_move_the_task_on_and_bad_input_is_one_line(
    duplex: Duplex, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    template = duplex.cwd / "approve.toml"
    template.write_text(APPROVE)
    with Client(f"sqlite:///{duplex.db_path}") as client:
        task = client.submit(template, {})
    assert step(duplex, task, "approval")[1] == "waiting"

    # The two commands as real processes (the console script).
    out = duplex.ok(
        "signal", task, "approved", "--payload", '{"by": "ana"}', "--id", "mail-1", script=True
    ).stdout
    assert out.startswith("signal approved completed step approval (")
    assert out.strip().endswith(f"enqueued ship; task {task} is in_progress")
    assert step(duplex, task, "approval")[1:] == ("complete", {"by": "ana"})
    ship, state, _ = step(duplex, task, "ship")
    assert state == "enqueued"
    result = '{"tracking": "T1"}'
    out = duplex.ok("complete", ship, "--result", result, "--reason", "by hand").stdout
    assert out.strip() == (
        f"step ship ({ship}) completed by hand; enqueued label; task {task} is in_progress"
    )
    assert step(duplex, task, "ship")[1:] == ("complete", {"tracking": "T1"})
    assert step(duplex, task, "label")[1] == "enqueued"

    # The rest in this process.
    monkeypatch.chdir(duplex.cwd)
    settings = ["--settings", str(duplex.cwd / "settings.toml")]
    capsys.readouterr()

    def exit_code(args: list[str]) -> object:
        try:
            return main([*settings, *args])
        except SystemExit as exc:  # argparse's refusals
            return exc.code

    def one_line_error(args: list[str], code: int, fragment: str) -> None:
        assert exit_code(args) == code
        captured = capsys.readouterr()
        assert captured.out == ""
        (line,) = captured.err.strip().splitlines()
        assert fragment in line, line

    assert main([*settings, "signal", task, "approved", "--id", "mail-1"]) == 0
    assert "already received" in capsys.readouterr().out
    one_line_error(["signal", task, "approved", "--payload", "{bad"], EXIT_USAGE, "not JSON")
    one_line_error(["signal", task, "approved"], EXIT_ERROR, "already complete")
    one_line_error(["signal", task, "nope"], EXIT_ERROR, "no wait step waits for it")
    one_line_error(["complete", ship, "--result", "[1]"], EXIT_USAGE, "not a JSON object")
    one_line_error(["complete", ship, "--result", "{}"], EXIT_ERROR, "it is complete")
    # Nothing the refusals touched changed.
    assert duplex.sql("SELECT count(*) FROM step_signals") == [(1,)]
    assert step(duplex, task, "ship")[1:] == ("complete", {"tracking": "T1"})
