"""The built wheel works on its own: console script and ``python -m app``, migrations included."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests import processes

REPO = Path(__file__).resolve().parent.parent

PIP_INSTALL = (sys.executable, "-m", "pip", "install", "--no-deps", "--quiet")

pytestmark = pytest.mark.e2e


def test_wheel_install_runs_migrate_and_status(tmp_path: Path) -> None:
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    processes.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = wheels.glob("duplex-*.whl")
    processes.run(
        [*PIP_INSTALL, "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    # The installed copy must win over the repository (no cwd or editable path to fall back on).
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEX_")}
    env["PYTHONPATH"] = str(target)
    probe = processes.run(
        [sys.executable, "-c", "import app, migrations; print(app.__file__, migrations.__file__)"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert all(path.startswith(str(target)) for path in probe.stdout.split())

    migrate = processes.run(
        [sys.executable, "-m", "app", "migrate"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stderr
    assert (work / "duplex.db").exists()
    script = target / "bin" / "duplex"
    status = processes.run(
        [sys.executable, str(script), "status", "--json"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    assert '"tasks": []' in status.stdout
