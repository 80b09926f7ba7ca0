"""The built wheel works on its own, as ``duplex``, beside a user's project with its own ``app``.

Installed, the repository's ``app/``, ``actors/`` and ``migrations/`` are one package, ``duplex``
(``package-dir`` in pyproject.toml), so the name most web projects give their own code is free.
"""

from __future__ import annotations

import json
import os
import site
import sys
from pathlib import Path

import pytest

from tests import processes

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e

USER_APP = '''\
"""The user's own package, named as most FastAPI and Flask projects name theirs."""
NAME = "the user's app"
'''

USER_HANDLERS = """\
from duplex import StepContext, step_handler

import app


@step_handler("greet")
def greet(ctx: StepContext) -> dict[str, str]:
    return {"greeting": f"hello from {app.NAME}"}
"""

USER_TEMPLATE = """\
name = "hello"
namespace = "default"
version = "1.0.0"

[[steps]]
name = "greet"
handler = "greet"
"""

USER_SUBMIT = """\
import app
import duplex
from duplex import Client
from duplex.settings import load_settings

assert app.NAME == "the user's app", app.__file__
with Client(load_settings()) as client:
    print(client.submit("hello.toml"))
print(app.__file__)
print(duplex.__file__)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheels = tmp_path_factory.mktemp("wheels")
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
    (built,) = wheels.glob("duplex-*.whl")
    return built


@pytest.fixture
def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A new virtual environment holding only the wheel; its dependencies are this one's."""
    venv = tmp_path / "venv"
    processes.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    (fresh_site,) = venv.glob("lib/python*/site-packages")
    # The dependencies come from the test environment, after the fresh site-packages: its
    # editable ``duplex`` is a .pth file of its own site-packages, which a path entry never runs.
    (fresh_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    processes.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "--quiet",
            str(wheel),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    return venv


def test_a_project_with_its_own_app_package_submits_and_runs_a_task(
    tmp_path: Path, fresh_venv: Path
) -> None:
    project = tmp_path / "project"
    (project / "app").mkdir(parents=True)
    (project / "app" / "__init__.py").write_text(USER_APP)
    (project / "app" / "handlers.py").write_text(USER_HANDLERS)
    (project / "hello.toml").write_text(USER_TEMPLATE)
    (project / "submit.py").write_text(USER_SUBMIT)
    (project / "settings.toml").write_text('[worker]\nhandler_modules = ["app.handlers"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DUPLEX_", "PYTHON"))}
    python, duplex = fresh_venv / "bin" / "python", fresh_venv / "bin" / "duplex"

    def run(*argv: str | Path) -> str:
        done = processes.run(
            [str(a) for a in argv],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return str(done.stdout)

    run(duplex, "migrate")
    task_uuid, app_file, duplex_file = run(python, "submit.py").split()
    assert Path(app_file) == project / "app" / "__init__.py"
    assert Path(duplex_file).is_relative_to(fresh_venv), duplex_file
    run(python, "-m", "duplex", "run", "--until-idle")
    status = json.loads(run(duplex, "status", task_uuid, "--json"))
    assert status["state"] == "complete", status
    (step,) = status["steps"]
    assert step["results"] == {"greeting": "hello from the user's app"}, step
