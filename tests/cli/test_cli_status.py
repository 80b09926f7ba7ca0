"""``duplex status`` judges which workers are alive by the liveness rule, the same for its
table and its ``--json`` (``duplex.cli.tasks``, ``duplex.storage.workers``)."""

from __future__ import annotations

import argparse
import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest

from duplex.cli.tasks import cmd_status, cmd_workers
from duplex.clock import utcnow
from duplex.storage.workers import mark_worker_stopped, register_worker
from tests.conftest import make_settings, sqlite_database

# Above any pid_max Linux allows: no process has it.
GONE_PID = 4_194_304 + 1


def test_a_heart_beating_worker_whose_process_is_gone_is_not_listed_as_alive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = sqlite_database(tmp_path / "d.db")
    with db.write() as conn:
        now = utcnow()
        register_worker(conn, "w-alive", hostname=socket.gethostname(), pid=os.getpid(), now=now)
        register_worker(conn, "w-gone", hostname=socket.gethostname(), pid=GONE_PID, now=now)
    db.dispose()
    settings = make_settings(f"sqlite:///{tmp_path / 'd.db'}")

    def status(*, as_json: bool) -> str:
        args = argparse.Namespace(
            task_uuid=None, json=as_json, limit=50, watch=False, interval=1.0, items=False
        )
        assert cmd_status(args, settings) == 0
        return capsys.readouterr().out

    listing = json.loads(status(as_json=True))
    assert [w["worker_id"] for w in listing["workers"]] == ["w-alive"]
    assert listing["workers"][0]["started_at"] == now.isoformat()
    table = status(as_json=False)
    assert "w-alive" in table
    assert "w-gone" not in table

    # `duplex workers` lists both, with the same verdicts.
    assert cmd_workers(argparse.Namespace(json=True, limit=100), settings) == 0
    verdicts = {w["worker_id"]: w["state"] for w in json.loads(capsys.readouterr().out)}
    assert verdicts == {"w-alive": "alive", "w-gone": "presumed dead"}


def test_an_alive_worker_is_listed_however_many_workers_beat_after_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """More stopped workers than ``duplex workers`` lists by default, each with a newer
    heartbeat, do not crowd out the one that is alive."""
    db = sqlite_database(tmp_path / "d.db")
    now = utcnow()
    with db.write() as conn:
        register_worker(conn, "w-alive", hostname="elsewhere", pid=1, now=now)
        for i in range(120):
            register_worker(conn, f"w-{i:03}", hostname="elsewhere", pid=2 + i, now=now)
            mark_worker_stopped(conn, f"w-{i:03}", now=now + timedelta(seconds=1), stats={})
    db.dispose()
    settings = make_settings(f"sqlite:///{tmp_path / 'd.db'}")

    args = argparse.Namespace(
        task_uuid=None, json=True, limit=50, watch=False, interval=1.0, items=False
    )
    assert cmd_status(args, settings) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [w["worker_id"] for w in listing["workers"]] == ["w-alive"]
    args.json = False
    assert cmd_status(args, settings) == 0
    assert "w-alive" in capsys.readouterr().out
