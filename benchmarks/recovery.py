"""Recovery time after SIGKILL, with the default liveness settings (claim_timeout_s = 30,
heartbeat_interval_s = 5): how long a dead worker's running steps wait before they run again.

Three cases, each a real ``duplex run`` process killed with SIGKILL while it holds running
attempts:

* SQLite, the only worker, restarted at once on the same host: the restart sees that the
  recorded process is gone and recovers at start-up.
* PostgreSQL, a second worker alive on the same host: it sees the process is gone.
* PostgreSQL, a second worker alive on "another host": the killed worker runs in a UTS
  namespace of its own (``unshare --uts``, root only) with another hostname, so only the
  heartbeat timeout can tell it is dead.

The figure is the time from the kill to the commit of the last ``worker_lost`` result.
Prints figures; asserts nothing. Run: ``make bench-recovery``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import machine_info  # noqa: E402

POSTGRES_URL = os.environ.get(
    "DUPLEX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
STEPS = 4
HANDLER_S = 3.0


def template(path: Path) -> Path:
    steps = "\n".join(
        f'[[steps]]\nname = "s{i}"\nhandler = "e2e.sleep"\ninputs = {{ seconds = {HANDLER_S} }}\n'
        for i in range(STEPS)
    )
    path.write_text(f'name = "recovery"\n\n{steps}')
    return path


class Case:
    """One database and the environment of the worker processes that share it."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.url = url
        self.workdir = workdir
        self.engine = create_engine(url)
        self.env = {
            **os.environ,
            "DUPLEX_SETTINGS": str(workdir / "settings.toml"),
            "DUPLEX_DATABASE__URL": url,
            "PYTHONPATH": str(ROOT),
        }
        (workdir / "settings.toml").write_text(
            "[worker]\n"
            'handler_modules = ["tests.e2e_handlers.handlers"]\n'
            "max_concurrent_handlers = 4\n"
            "[event_system]\npolling_interval_ms = 100\n"
            '[logging]\nlevel = "WARNING"\n'
        )

    def duplex(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "duplex", *args]

    def submit(self) -> None:
        subprocess.run(
            self.duplex("submit", str(template(self.workdir / "t.toml"))),
            env=self.env,
            cwd=self.workdir,
            check=True,
            capture_output=True,
        )

    def start(self, prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*prefix, *self.duplex("run")],
            env=self.env,
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "worker.log", "ab"),
        )

    def scalar(self, query: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text(query)).scalar_one())

    def running(self) -> int:
        return self.scalar("SELECT count(*) FROM workflow_steps WHERE state = 'in_progress'")

    def lost(self) -> int:
        return self.scalar(
            "SELECT count(*) FROM workflow_step_transitions WHERE reason = 'worker_lost'"
        )

    def reset(self) -> None:
        with self.engine.begin() as conn:
            for table in ("domain_events", "workflow_step_transitions", "workflow_step_edges"):
                conn.execute(text(f"DELETE FROM {table}"))
            conn.execute(text("DELETE FROM workflow_steps"))
            conn.execute(text("DELETE FROM tasks"))


def wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


def kill(process: subprocess.Popen[bytes]) -> float:
    process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    process.wait()
    return killed_at


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def sqlite_restart(workdir: Path) -> float:
    """Kill the only worker, start a new one at once; kill -> all attempts recovered."""
    case = Case(f"sqlite:///{workdir / 'duplex.db'}", workdir)
    subprocess.run(
        case.duplex("migrate"), env=case.env, cwd=workdir, check=True, capture_output=True
    )
    case.submit()
    first = case.start()
    try:
        wait(lambda: case.running() == STEPS, 30, "the first worker to claim")
        killed_at = kill(first)
        second = case.start()
        try:
            wait(lambda: case.lost() == STEPS, 60, "recovery")
            return time.monotonic() - killed_at
        finally:
            stop(second)
    finally:
        stop(first)


def postgres_kill(workdir: Path, schema: str, *, other_host: bool) -> float:
    """Two workers; kill the one holding running attempts; kill -> its attempts recovered."""
    case = Case(f"{POSTGRES_URL}?options=-csearch_path%3D{schema}", workdir)
    subprocess.run(
        case.duplex("migrate"), env=case.env, cwd=workdir, check=True, capture_output=True
    )
    prefix = ["unshare", "--uts", "sh", "-c", 'hostname duplex-bench-other && exec "$@"', "sh"]
    victim = case.start(prefix if other_host else ())
    survivor: subprocess.Popen[bytes] | None = None
    try:
        case.submit()
        wait(lambda: case.running() == STEPS, 30, "the first worker to claim")
        survivor = case.start()
        time.sleep(1.0)  # the survivor is up and heart-beating
        killed_at = kill(victim)
        wait(lambda: case.lost() == STEPS, 90, "recovery")
        return time.monotonic() - killed_at
    finally:
        stop(victim)
        if survivor is not None:
            stop(survivor)


def postgres_schema() -> str:
    schema = f"duplex_recovery_{os.getpid()}"
    with create_engine(POSTGRES_URL).begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    return schema


def drop_schema(schema: str) -> None:
    with create_engine(POSTGRES_URL).begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def report(name: str, figures: list[float]) -> dict[str, float]:
    print(
        f"{name:<44} median {statistics.median(figures):6.2f} s   "
        f"min {min(figures):6.2f} s   max {max(figures):6.2f} s   ({len(figures)} runs)",
        flush=True,
    )
    return {"median_s": statistics.median(figures), "max_s": max(figures)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    for key, value in machine_info().items():
        print(f"{key}: {value}")
    print(f"{STEPS} running attempts of {HANDLER_S:g} s handlers; defaults: claim_timeout_s 30")
    results: dict[str, dict[str, float]] = {}

    def rounds(run: Callable[[Path], float]) -> list[float]:
        figures = []
        for _ in range(args.rounds):
            workdir = Path(tempfile.mkdtemp(prefix="duplex-recovery-"))
            try:
                figures.append(run(workdir))
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        return figures

    results["sqlite_same_host_restart"] = report(
        "SQLite, restart on the same host", rounds(sqlite_restart)
    )
    schema = postgres_schema()
    try:
        for other_host, name in ((False, "same host"), (True, "another host (heartbeat)")):

            def run(workdir: Path, other_host: bool = other_host) -> float:
                try:
                    return postgres_kill(workdir, schema, other_host=other_host)
                finally:
                    Case(f"{POSTGRES_URL}?options=-csearch_path%3D{schema}", workdir).reset()

            results[f"postgres_{name.split()[0]}_host"] = report(
                f"PostgreSQL, second worker alive, {name}", rounds(run)
            )
    finally:
        drop_schema(schema)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
