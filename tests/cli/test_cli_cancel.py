"""``duplex cancel --step`` and ``Client.cancel``, in-process on SQLite: the arguments, the line
each prints, and one-line refusals that write nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from duplex import Client
from duplex.cli.main import main
from duplex.errors import InputError
from duplex.storage.db import Database
from duplex.templates import parse_template
from tests.actors.support import step_row

TEMPLATE = (
    'name = "c"\n[[steps]]\nname = "a"\nhandler = "t.h"\n[[steps]]\nname = "b"\nhandler = "t.h"\n'
)


def test_cancel_step_and_task_from_the_cli_and_the_client(
    sqlite_db: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = tmp_path / "settings.toml"
    settings.write_text(f'[database]\nurl = "{sqlite_db.url}"\n')
    cli = ["--settings", str(settings), "cancel"]
    with Client(sqlite_db) as client:
        task = client.submit(parse_template(TEMPLATE), {})
        a = step_row(sqlite_db, task, "a").step_uuid

        assert main([*cli, "--step", a, "--reason", "not needed"]) == 0
        line = capsys.readouterr().out.strip()
        assert line == f"step 'a' ({a}) cancelled; task {task} is pending"
        # Again: refused in one line, exit 1.
        assert main([*cli, "--step", a]) == 1
        err = capsys.readouterr().err.strip()
        assert "it is cancelled" in err
        assert "\n" not in err
        # Neither or both of TASK and --step.
        assert main(cli) != 0
        assert main([*cli, task, "--step", a]) != 0
        assert "give either TASK_UUID or --step STEP_UUID" in capsys.readouterr().err

        report = client.cancel(task)
        assert report.summary == f"cancelled task {task}: 1 step(s) cancelled"
        with pytest.raises(InputError):
            client.cancel()
    assert step_row(sqlite_db, task, "b").state == "cancelled"
