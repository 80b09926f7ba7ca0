"""Idle latency of chained steps: a `duplex run` process serving, tasks submitted from this one.

    .venv/bin/python benchmarks/latency.py [--only NAME ...] [--runs N] [--peers]
                                           [--set SECTION.KEY=VALUE ...]

Workloads, on SQLite (a fresh, migrated file) and on PostgreSQL (a fresh schema in
``$DUPLEX_TEST_POSTGRES_URL`` or postgresql+psycopg://postgres@127.0.0.1:5432/test, skipped
when unreachable):

* chain4: a task of 4 no-op steps, each depending on the one before (the peers' 4-step chain
  in ``../shared/peers/latency/``). Per run the clock starts before ``Client.submit`` and stops
  when a read of the task's state, repeated every 1 ms (Celery's ``r.get(interval=0.001)``),
  finds it complete. 3 warm-up runs are discarded, then ``--runs`` (40) are timed, 50 ms apart.
* chain1600: one task of 1600 no-op steps in a line, from submit to complete: ms per hop.

Each also prints where the time went, from the timestamps in SQL (task created, first step
claimed, steps started and committed).

The worker is the real CLI (``python -m duplex run``) in its own process, with
``benchmarks/empty_settings.toml`` and ``DUPLEX_<SECTION>__<KEY>`` variables: 10 handler slots,
``benchmarks.handlers``, every other setting at its default unless ``--set`` changes it (e.g.
``--set worker.commit_linger_ms=0 --set event_system.polling_interval_ms=20``). Nothing is
measured before its ``workers`` row is registered and it has completed a first task.

``--peers`` then runs ``shared/peers/latency/run.sh`` (Celery and Dramatiq on Redis, the same
chain; found beside this checkout or a parent of it, or in ``$PEERS_DIR``; it needs the
environment ``$PEERS_VENV``, /tmp/duplex-peers-venv by default, that ``shared/peers/run.sh 0``
creates) and prints Duplex's p50 and p95 as ratios against theirs. Figures only: nothing
here asserts. Every process started here is stopped (SIGTERM, then SIGKILL) on the way out.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import bindparam, select

from benchmarks._common import (
    POLL_S,
    chain_template_text,
    database,
    fmt_s,
    print_load,
    print_machine_info,
)
from duplex import Client
from duplex.errors import ConfigurationError
from duplex.settings import Settings, load_settings
from duplex.states import TASK_CANCELLED, TASK_COMPLETE, TASK_ERROR
from duplex.storage.db import Database
from duplex.storage.models import tasks, workers, workflow_steps
from duplex.templates import TaskTemplate, parse_template

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_FILE = ROOT / "benchmarks" / "empty_settings.toml"
HANDLER = "bench.noop"
CONCURRENCY = 10
SHORT_CHAIN = 4
LONG_CHAIN = 1600
WARM_UP_RUNS = 3
READ_EVERY_S = 0.001  # the peers: Celery's r.get(interval=0.001)
PAUSE_S = 0.050  # between runs, as the peers sleep
RUN_TIMEOUT_S = 30.0
LONG_CHAIN_TIMEOUT_S = 900.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
DATABASES = ("sqlite", "postgres")
WORKLOADS = ("chain4", "chain1600")
# What decides how soon work is seen and results are committed: printed with the figures.
LATENCY_SETTINGS = (
    ("event_system", "deployment_mode"),
    ("event_system", "polling_interval_ms"),
    ("worker", "commit_linger_ms"),
    ("worker", "max_concurrent_handlers"),
)
PEERS_VENV = Path(os.environ.get("PEERS_VENV", "/tmp/duplex-peers-venv"))
PEER_LINE = re.compile(
    r"^(?P<peer>\w+) chain4 runs=(?P<runs>\d+) p50=(?P<p50>[\d.]+)ms "
    r"p95=(?P<p95>[\d.]+)ms max=(?P<max>[\d.]+)ms"
)

_TASK_STATE = select(tasks.c.state).where(tasks.c.task_uuid == bindparam("task_uuid"))


@dataclass(frozen=True)
class Latency:
    """Figures of one series of runs, computed as the peers compute theirs."""

    runs: int
    p50_ms: float
    p95_ms: float
    max_ms: float
    min_ms: float | None = None  # the peers do not print theirs

    @classmethod
    def of(cls, ms: list[float]) -> Latency:
        ordered = sorted(ms)
        return cls(
            len(ordered),
            statistics.median(ordered),
            ordered[int(0.95 * (len(ordered) - 1))],
            ordered[-1],
            ordered[0],
        )

    def line(self) -> str:
        low = "" if self.min_ms is None else f"min {self.min_ms:.1f} ms, "
        return (
            f"p50 {self.p50_ms:.1f} ms, p95 {self.p95_ms:.1f} ms, max {self.max_ms:.1f} ms"
            f" ({low}{self.runs} runs)"
        )


def _header(name: str, description: str) -> None:
    print(f"== {name}: {description}")


# --- the worker process ------------------------------------------------------------------------


def parse_overrides(values: list[str]) -> dict[str, str]:
    """``section.key=value`` items as the ``DUPLEX_SECTION__KEY`` variables the worker reads."""
    env: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not section.isidentifier() or not key.isidentifier():
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        if (section.lower(), key.lower()) == ("database", "url"):
            raise ValueError("--set database.url: the benchmark gives each run its own database")
        env[f"DUPLEX_{section.upper()}__{key.upper()}"] = value
    return env


def worker_env(url: str, overrides: dict[str, str]) -> dict[str, str]:
    """The environment of ``duplex run``: the benchmark's settings, then ``--set``'s."""
    return {
        **os.environ,
        "DUPLEX_SETTINGS": str(SETTINGS_FILE),
        "DUPLEX_WORKER__HANDLER_MODULES": '["benchmarks.handlers"]',
        "DUPLEX_WORKER__MAX_CONCURRENT_HANDLERS": str(CONCURRENCY),
        "DUPLEX_LOGGING__LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
        **overrides,
        "DUPLEX_DATABASE__URL": url,
    }


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def effective_settings(env: dict[str, str]) -> Settings:
    """The settings ``duplex run`` reads from ``env`` (loaded here the way it loads them)."""
    with _environment(env):
        return load_settings(SETTINGS_FILE)


def describe_settings(settings: Settings) -> str:
    return ", ".join(
        f"{section}.{key} = {getattr(getattr(settings, section), key)}"
        for section, key in LATENCY_SETTINGS
    )


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    # A session of its own: a Ctrl-C in the terminal reaches only this process, which then
    # stops the worker itself (see stop), instead of both racing.
    return subprocess.Popen(
        [sys.executable, "-m", "duplex", "run"], env=env, cwd=ROOT, start_new_session=True
    )


def stop(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGTERM to the process's group (it leads one: ``start_new_session``), then SIGKILL."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(
            f"   process {process.pid} still running {STOP_TIMEOUT_S:.0f} s after SIGTERM: killed"
        )
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_until_registered(db: Database, process: subprocess.Popen[bytes]) -> float:
    """Seconds until the worker's ``workers`` row is there (it registers after migrating)."""
    t0 = time.perf_counter()
    query = select(workers.c.worker_id).where(
        workers.c.pid == process.pid, workers.c.stopped_at.is_(None)
    )
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"duplex run exited ({process.returncode}) before it registered")
        with db.read() as conn:
            if conn.execute(query).first() is not None:
                return time.perf_counter() - t0
        if time.perf_counter() - t0 > START_TIMEOUT_S:
            raise RuntimeError(f"duplex run did not register within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


# --- one task, submit to complete ----------------------------------------------------------


def task_state(db: Database, task_uuid: str) -> str:
    with db.read() as conn:
        return str(conn.execute(_TASK_STATE, {"task_uuid": task_uuid}).scalar_one())


def submit_and_wait(
    client: Client,
    template: TaskTemplate,
    process: subprocess.Popen[bytes],
    *,
    read_every_s: float,
    timeout_s: float,
) -> tuple[str, float, float]:
    """Submit one task; read its state every ``read_every_s`` until it is complete.

    Returns the task's UUID, the seconds ``Client.submit`` took, and the seconds from just
    before the submit to the read that found the task complete.
    """
    t0 = time.perf_counter()
    task_uuid = client.submit(template)
    submitted_s = time.perf_counter() - t0
    while True:
        state = task_state(client.db, task_uuid)
        if state == TASK_COMPLETE:
            return task_uuid, submitted_s, time.perf_counter() - t0
        if state in (TASK_ERROR, TASK_CANCELLED):
            raise RuntimeError(f"task {task_uuid} ended {state}")
        if process.poll() is not None:
            raise RuntimeError(f"duplex run exited ({process.returncode}) during a run")
        if time.perf_counter() - t0 > timeout_s:
            raise RuntimeError(f"task {task_uuid} not complete after {timeout_s:.0f} s ({state})")
        time.sleep(read_every_s)


@dataclass(frozen=True)
class Recorded:
    """A task's times as the database recorded them (milliseconds)."""

    first_claim_ms: float  # from the task's created_at to its first step's claimed_at
    claim_to_complete_ms: float  # from that claim to the task's completed_at


def recorded(db: Database, task_uuids: list[str]) -> list[Recorded]:
    """Where each task's time went, from the timestamps the submitter and the worker wrote."""
    ws = workflow_steps
    query = (
        select(tasks.c.created_at, tasks.c.completed_at, ws.c.claimed_at)
        .join(ws, ws.c.task_uuid == tasks.c.task_uuid)
        .where(tasks.c.task_uuid.in_(task_uuids), ws.c.name == "s000000")
    )
    with db.read() as conn:
        rows = conn.execute(query).all()
    return [
        Recorded(
            (claimed - created).total_seconds() * 1000,
            (completed - claimed).total_seconds() * 1000,
        )
        for created, completed, claimed in rows
        if claimed is not None and completed is not None
    ]


def hop_breakdown(db: Database, task_uuid: str) -> dict[str, float]:
    """Median milliseconds of each part of a hop of a chain, from the recorded timestamps.

    A step's ``claimed_at`` (the clock read as its claim began), ``started_at`` (its handler's
    start) and ``completed_at`` (the clock read as the commit of its result began), then the
    next step's ``claimed_at``.
    """
    ws = workflow_steps
    query = (
        select(ws.c.claimed_at, ws.c.started_at, ws.c.completed_at)
        .where(ws.c.task_uuid == task_uuid)
        .order_by(ws.c.name)
    )
    with db.read() as conn:
        rows = conn.execute(query).all()
    parts: dict[str, list[float]] = {
        "claim to handler start": [],
        "handler start to its commit (handler, linger)": [],
        "commit to the next claim": [],
    }
    for (claimed, started, committed), following in itertools.pairwise(rows):
        for name, a, b in zip(
            parts, (claimed, started, committed), (started, committed, following[0]), strict=True
        ):
            parts[name].append((b - a).total_seconds() * 1000)
    return {name: statistics.median(ms) for name, ms in parts.items() if ms}


# --- the workloads ---------------------------------------------------------------------------


@dataclass
class Figures:
    """What one database's runs measured."""

    chain4: Latency | None = None
    hop_ms: float | None = None


def bench_chain4(
    db: Database, client: Client, process: subprocess.Popen[bytes], runs: int, backend: str
) -> Latency:
    template = parse_template(chain_template_text(SHORT_CHAIN, HANDLER, name="chain4"))
    _header(
        f"chain4/{backend}",
        f"{SHORT_CHAIN} no-op steps in a line, submit to complete, the state read every "
        f"{READ_EVERY_S * 1000:.0f} ms; {WARM_UP_RUNS} warm-up runs, then {runs}, "
        f"{PAUSE_S * 1000:.0f} ms apart",
    )
    ms: list[float] = []
    submits_ms: list[float] = []
    uuids: list[str] = []
    for i in range(WARM_UP_RUNS + runs):
        task_uuid, submit_s, elapsed_s = submit_and_wait(
            client, template, process, read_every_s=READ_EVERY_S, timeout_s=RUN_TIMEOUT_S
        )
        if i >= WARM_UP_RUNS:
            ms.append(elapsed_s * 1000)
            submits_ms.append(submit_s * 1000)
            uuids.append(task_uuid)
        time.sleep(PAUSE_S)
    latency = Latency.of(ms)
    print(f"   {latency.line()}")
    times = recorded(db, uuids)
    if times:
        claim = statistics.median(t.first_claim_ms for t in times)
        rest = statistics.median(t.claim_to_complete_ms for t in times)
        print(
            f"   medians: Client.submit took {statistics.median(submits_ms):.1f} ms; as recorded"
            f" in SQL, created to first step claimed {claim:.1f} ms, first step claimed to task"
            f" complete {rest:.1f} ms"
        )
        hops = [hop_breakdown(db, task_uuid) for task_uuid in uuids]
        print(
            "   a hop as recorded in SQL (medians): "
            + ", ".join(
                f"{name} {statistics.median(h[name] for h in hops):.2f} ms" for name in hops[0]
            )
        )
    print()
    return latency


def bench_long_chain(
    db: Database, client: Client, process: subprocess.Popen[bytes], backend: str
) -> float:
    template = parse_template(chain_template_text(LONG_CHAIN, HANDLER, name="chain1600"))
    _header(
        f"chain1600/{backend}",
        f"one task of {LONG_CHAIN} no-op steps in a line, submit to complete (the state read "
        f"every {POLL_S * 1000:.0f} ms)",
    )
    task_uuid, submit_s, elapsed_s = submit_and_wait(
        client, template, process, read_every_s=POLL_S, timeout_s=LONG_CHAIN_TIMEOUT_S
    )
    hop_ms = elapsed_s * 1000 / LONG_CHAIN
    print(
        f"   {fmt_s(elapsed_s)} = {hop_ms:.2f} ms per hop (submit {fmt_s(submit_s)} of it, "
        "template parsed beforehand)"
    )
    times = recorded(db, [task_uuid])
    if times:
        t = times[0]
        print(
            f"   as recorded in SQL: first step claimed {t.first_claim_ms:.1f} ms after the task "
            f"was created, then {t.claim_to_complete_ms / LONG_CHAIN:.2f} ms per step to the "
            "task's completion"
        )
    parts = hop_breakdown(db, task_uuid)
    if parts:
        print(
            "   a hop as recorded in SQL (medians): "
            + ", ".join(f"{name} {ms:.2f} ms" for name, ms in parts.items())
        )
    print()
    return hop_ms


def bench_database(
    backend: str, workloads: list[str], runs: int, overrides: dict[str, str]
) -> Figures | None:
    with database(backend) as db:
        if db is None:
            print(f"== {backend}: PostgreSQL not reachable, skipped\n")
            return None
        figures = Figures()
        process = start_worker(worker_env(db.url, overrides))
        try:
            registered_s = wait_until_registered(db, process)
            with Client(db) as client:
                warm_up = parse_template(chain_template_text(SHORT_CHAIN, HANDLER, name="first"))
                _, _, first_s = submit_and_wait(
                    client, warm_up, process, read_every_s=POLL_S, timeout_s=START_TIMEOUT_S
                )
                print(
                    f"-- {backend}: duplex run (pid {process.pid}) registered after "
                    f"{fmt_s(registered_s)}; its first task complete {fmt_s(first_s)} after "
                    "its submit"
                )
                if "chain4" in workloads:
                    figures.chain4 = bench_chain4(db, client, process, runs, backend)
                if "chain1600" in workloads:
                    figures.hop_ms = bench_long_chain(db, client, process, backend)
        finally:
            stop(process)
        if process.returncode:
            print(f"   !! duplex run exited with {process.returncode}")
        return figures


# --- the peers -------------------------------------------------------------------------------


def peers_script() -> Path | None:
    """``shared/peers/latency/run.sh`` beside this checkout or one of its parents."""
    explicit = os.environ.get("PEERS_DIR")
    candidates = [Path(explicit)] if explicit else [d / "shared" / "peers" for d in ROOT.parents]
    for directory in candidates:
        script = directory / "latency" / "run.sh"
        if script.is_file():
            return script
    return None


def run_peers(runs: int) -> dict[str, Latency] | None:
    """Run the peers' latency script; their figures by peer name (None when it could not)."""
    script = peers_script()
    _header("peers", f"Celery (chain) and Dramatiq (pipeline) on Redis, {runs} runs each")
    if script is None:
        print("   no shared/peers/latency/run.sh found (PEERS_DIR names its folder)\n")
        return None
    if not (PEERS_VENV / "bin" / "celery").exists():
        print(
            f"   no peers' environment at {PEERS_VENV}: create it with "
            f"`{script.parent.parent / 'run.sh'} 0` (a few minutes), or set PEERS_VENV\n"
        )
        return None
    process = subprocess.Popen(
        [str(script), str(runs)],
        env={**os.environ, "PEERS_VENV": str(PEERS_VENV)},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # stop() then reaches the peers' workers too
    )
    figures: dict[str, Latency] = {}
    try:
        assert process.stdout is not None
        for line in process.stdout:
            print(f"   {line.rstrip()}")
            match = PEER_LINE.match(line.strip())
            if match:
                figures[match["peer"]] = Latency(
                    int(match["runs"]),
                    float(match["p50"]),
                    float(match["p95"]),
                    float(match["max"]),
                )
        process.wait()
    finally:
        stop(process)
    if process.returncode:
        print(f"   !! {script} exited with {process.returncode}")
    print()
    return figures or None


def print_ratios(ours: dict[str, Figures], peers: dict[str, Latency]) -> None:
    """Duplex's chain4 p50 and p95 over each peer's, per database."""
    rows = []
    for backend, figures in ours.items():
        if figures.chain4 is None:
            continue
        for peer in ("celery", "dramatiq"):
            theirs = peers.get(peer)
            if theirs is None:
                continue
            for metric, mine, base in (
                ("p50", figures.chain4.p50_ms, theirs.p50_ms),
                ("p95", figures.chain4.p95_ms, theirs.p95_ms),
            ):
                rows.append(
                    (
                        f"chain4/{backend}",
                        metric,
                        f"Duplex / {peer.capitalize()}",
                        f"{mine / base:.2f}",
                        f"{mine:.1f} ms / {base:.1f} ms",
                    )
                )
    print_rows(("workload", "metric", "ratio of", "ratio", "figures"), rows)


def print_summary(figures: dict[str, Figures]) -> None:
    """One line per database: chain4's p50, p95 and max, chain1600's time per hop."""

    rows = []
    for backend, f in figures.items():
        lat = f.chain4
        chain4 = (lat.p50_ms, lat.p95_ms, lat.max_ms) if lat else ()
        cells = [f"{value:.1f} ms" for value in chain4] or ["", "", ""]
        hop = "" if f.hop_ms is None else f"{f.hop_ms:.2f} ms"
        rows.append((backend, *cells, hop))
    headers = ("database", "chain4 p50", "chain4 p95", "chain4 max", "chain1600 per hop")
    print_rows(headers, rows)


def print_rows(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    if not rows:
        return
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line.rstrip())
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


# --- main ------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # a SIGTERM stops the workers on the way out, as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--only",
        action="append",
        choices=[*DATABASES, *WORKLOADS],
        metavar="NAME",
        help="only this database or workload (repeatable): " + ", ".join(DATABASES + WORKLOADS),
    )
    parser.add_argument(
        "--runs", type=int, default=40, help="timed runs of chain4 per database (default 40)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="SECTION.KEY=VALUE",
        help="a setting of the worker process (repeatable), e.g. worker.commit_linger_ms=0",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="then run ../shared/peers/latency/run.sh and print ratios against its figures",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    only = set(args.only or ())
    databases = [d for d in DATABASES if d in only] or list(DATABASES)
    workloads = [w for w in WORKLOADS if w in only] or list(WORKLOADS)
    try:
        overrides = parse_overrides(args.overrides)
        settings = effective_settings(worker_env("sqlite:///unused.db", overrides))
    except (ValueError, ConfigurationError) as exc:
        parser.error(str(exc))

    signal.signal(signal.SIGTERM, _interrupt)
    print_machine_info()
    print("worker: `python -m duplex run`, one process, settings in effect:")
    print(f"   {describe_settings(settings)}")
    shown = ", ".join(args.overrides) if args.overrides else "none (Duplex's defaults)"
    print(f"   --set: {shown}")
    if settings.event_system.deployment_mode != "polling":
        print("   (on SQLite the worker polls whatever the mode; it says so in a warning)")
    print()

    figures: dict[str, Figures] = {}
    try:
        for backend in databases:
            measured = bench_database(backend, workloads, args.runs, overrides)
            if measured is not None:
                figures[backend] = measured
        peers = run_peers(args.runs) if args.peers else None
    except KeyboardInterrupt:
        print("\ninterrupted: every process started here was stopped")
        return 130
    print_load()
    print_summary(figures)
    if peers:
        print("\nagainst the peers measured right after (below 1: Duplex is faster)")
        for name, lat in sorted(peers.items()):
            print(f"   {name}: {lat.line()}")
        print()
        print_ratios(figures, peers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
