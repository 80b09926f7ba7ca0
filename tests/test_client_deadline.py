"""``max_duration`` at submission: ``Client.submit``/``submit_many`` and ``duplex submit
--max-duration`` set ``tasks.deadline_at``; the template's is the default; bad values are
one-line errors that write nothing."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from duplex import Client
from duplex.cli.main import main
from duplex.errors import InputError
from duplex.storage.db import Database
from duplex.storage.models import tasks
from duplex.templates import parse_template

TEMPLATE = 'name = "dl"\nmax_duration = "1h"\n[[steps]]\nname = "a"\nhandler = "t.h"\n'
PLAIN = 'name = "plain"\n[[steps]]\nname = "a"\nhandler = "t.h"\n'


def spans(db: Database, task_uuids: list[str]) -> list[timedelta | None]:
    """Each task's deadline less its submission time (None: no deadline)."""
    query = select(tasks.c.task_uuid, tasks.c.created_at, tasks.c.deadline_at).where(
        tasks.c.task_uuid.in_(task_uuids)
    )
    with db.read() as conn:
        found = {
            row.task_uuid: None if row.deadline_at is None else row.deadline_at - row.created_at
            for row in conn.execute(query)
        }
    return [found[task] for task in task_uuids]


def test_the_template_sets_the_deadline_and_a_submission_overrides_it(sqlite_db: Database) -> None:
    with Client(sqlite_db) as client:
        default = client.submit(parse_template(TEMPLATE), {})
        shorter = client.submit(parse_template(TEMPLATE), {}, max_duration=timedelta(minutes=5))
        many = client.submit_many(
            parse_template(PLAIN), [{}, {}], max_duration=timedelta(seconds=30)
        )
        none = client.submit(parse_template(PLAIN), {})
    assert spans(sqlite_db, [default, shorter, *many, none]) == [
        timedelta(hours=1),
        timedelta(minutes=5),
        timedelta(seconds=30),
        timedelta(seconds=30),
        None,
    ]


@pytest.mark.parametrize("bad", [timedelta(0), timedelta(seconds=-1), timedelta(days=4000), 15])
def test_a_bad_max_duration_is_refused_before_anything_is_written(
    sqlite_db: Database, bad: object
) -> None:
    with Client(sqlite_db) as client, pytest.raises(InputError, match="max_duration") as info:
        client.submit(parse_template(PLAIN), {}, max_duration=bad)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    with sqlite_db.read() as conn:
        assert conn.execute(select(func.count()).select_from(tasks)).scalar_one() == 0


def test_duplex_submit_takes_max_duration(
    sqlite_db: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = tmp_path / "settings.toml"
    settings.write_text(f'[database]\nurl = "{sqlite_db.url}"\n')
    template = tmp_path / "plain.toml"
    template.write_text(PLAIN)
    assert main(["--settings", str(settings), "submit", str(template), "--max-duration", "2s"]) == 0
    task = capsys.readouterr().out.strip().splitlines()[-1]
    assert spans(sqlite_db, [task]) == [timedelta(seconds=2)]
    with pytest.raises(SystemExit) as exit_info:
        main(["--settings", str(settings), "submit", str(template), "--max-duration", "2 s"])
    assert exit_info.value.code == 2
    assert "not a duration: '2 s'" in capsys.readouterr().err
