"""``duplex status`` judges which workers are alive by the liveness rule, the same for its
table and its ``--json`` (``duplex.cli.tasks``, ``duplex.storage.workers``)."""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import pytest

from duplex.cli.tasks import cmd_status, cmd_workers
from duplex.clock import utcnow
from duplex.storage.workers import register_worker
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
        args = argparse.Namespace(task_uuid=None, json=as_json, limit=50, watch=False, interval=1.0)
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
