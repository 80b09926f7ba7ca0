"""``Client.submit``/``submit_many`` with ``run_at``, ``delay`` and ``priority``: stored on the
roots, one line for bad input and nothing written."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from duplex.client import Client
from duplex.clock import utcnow
from duplex.errors import InputError
from duplex.storage.models import tasks, workflow_steps
from duplex.templates import parse_template
from tests.conftest import sqlite_database

TEMPLATE = parse_template(
    'name = "t"\npriority = 3\n[[steps]]\nname = "a"\nhandler = "h"\n'
    '[[steps]]\nname = "b"\nhandler = "h"\ndepends_on = ["a"]\npriority = -1\n'
)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    db = sqlite_database(tmp_path / "c.db")
    with Client(db) as c:
        yield c
    db.dispose()


def steps(client: Client) -> list[Any]:
    with client.db.read() as conn:
        return list(conn.execute(select(workflow_steps).order_by(workflow_steps.c.position)))


def test_run_at_delay_and_priority_reach_the_steps(client: Client) -> None:
    at = utcnow() + timedelta(hours=2)
    client.submit(TEMPLATE, run_at=at, priority=40)
    before = utcnow()
    client.submit_many(TEMPLATE, [{}, {}], delay=timedelta(minutes=5))
    rows = steps(client)
    firsts = [(r.next_attempt_at, r.priority) for r in rows if r.name == "a"]
    assert firsts[0] == (at, 40)
    assert all(
        before + timedelta(minutes=5) <= t <= utcnow() + timedelta(minutes=5) for t, _ in firsts[1:]
    )
    assert [p for _, p in firsts[1:]] == [3, 3]
    assert {r.priority for r in rows if r.name == "b"} == {-1}


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"run_at": datetime(2030, 1, 1)}, "has no time zone"),
        ({"run_at": utcnow(), "delay": timedelta(seconds=1)}, "not both"),
        ({"priority": 500}, "out of range"),
        ({"delay": "15m"}, "must be a timedelta"),
    ],
)
def test_bad_input_is_refused_and_nothing_written(
    client: Client, kwargs: dict[str, Any], problem: str
) -> None:
    with pytest.raises(InputError, match=problem):
        client.submit(TEMPLATE, **kwargs)
    with pytest.raises(InputError, match=problem):
        client.submit_many(TEMPLATE, [{}], **kwargs)
    with client.db.read() as conn:
        assert conn.execute(select(func.count()).select_from(tasks)).scalar_one() == 0
