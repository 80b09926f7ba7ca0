"""Duplex's figures as ratios against the peers' last run on this machine.

``../shared/peers/run.sh`` runs Dramatiq, Celery and procrastinate on the same workloads and
writes one JSON line per run to ``$PEERS_OUT/results.jsonl`` (``/tmp/duplex-peers`` unless
set). Absolute figures on a shared machine move by 2x from day to day, so the throughput
targets are ratios against figures taken right before or after, and this prints them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import Result

RESULTS = Path(os.environ.get("PEERS_OUT", "/tmp/duplex-peers")) / "results.jsonl"
PEERS_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "peers"
PEERS_PYTHON = Path(os.environ.get("PEERS_VENV", "/tmp/duplex-peers-venv")) / "bin" / "python"
# W1: 1000 tasks sleeping 100 ms at concurrency 10, so the ceiling is 100 tasks/s.
W1_CEILING = 100.0


@dataclass(frozen=True)
class PeerFigures:
    """Medians over the rounds of one run of ``run.sh``."""

    noop_tps: dict[str, float]  # W2: 5000 no-op jobs
    sleep_efficiency: dict[str, float]  # W1
    enqueue_s: dict[str, float]  # W2's enqueue: a new process, imports and connecting included
    taken_at: float  # when the file was written (seconds since the epoch)


def load(path: Path = RESULTS) -> PeerFigures | None:
    """The medians in ``path``, or None when there is no readable run."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for line in lines:
        try:
            run = json.loads(line)
            runs.setdefault((run["peer"], run["workload"]), []).append(run)
        except (ValueError, KeyError, TypeError):
            continue
    if not runs:
        return None

    def median(workload: str, key: str, scale: float = 1.0) -> dict[str, float]:
        return {
            peer: statistics.median(float(r[key]) for r in rs) * scale
            for (peer, wl), rs in runs.items()
            if wl == workload
        }

    return PeerFigures(
        noop_tps=median("W2", "tps"),
        sleep_efficiency=median("W1", "tps", 1 / W1_CEILING),
        enqueue_s=median("W2", "enqueue_s"),
        taken_at=path.stat().st_mtime,
    )


def seconds(value: str) -> float:
    """A duration as ``fmt_s`` prints it ("410.4 ms", "1.03 s") in seconds."""
    number, unit = value.split()
    return float(number) / 1000 if unit == "ms" else float(number)


def ratios(results: list[Result], peers: PeerFigures) -> list[Result]:
    """The throughput targets, each as a ratio against the peers' figures (or an absolute one)."""
    found = {(r.scenario, r.metric): r.value for r in results}
    dramatiq = peers.noop_tps.get("dramatiq")
    out: list[Result] = []

    def against(scenario: str, metric: str, base: float | None, label: str, target: float) -> None:
        value = found.get((scenario, metric))
        if value is None or not base:
            return
        ratio = float(value) / base
        out.append(Result(scenario, f"x {label}", f"{ratio:.2f}", f">= {target}", ratio >= target))

    against("tasks", "steps/s", dramatiq, "Dramatiq", 1.5)
    against("noop", "steps/s", dramatiq, "Dramatiq", 2.0)
    against("postgres/1p", "steps/s", dramatiq, "Dramatiq", 1.0)
    one_process = found.get(("postgres/1p", "steps/s"))
    against("postgres/2p", "steps/s", float(one_process or 0), "one process", 1.5)
    for scenario, metric, target in (
        ("sleep", "efficiency", 0.98),
        ("sleep", "efficiency, peers' clock", 0.98),
        ("fanout", "efficiency", 0.97),
        ("fanout", "efficiency, peers' clock", 0.97),
    ):
        value = found.get((scenario, metric))
        if value is not None:
            out.append(Result(scenario, metric, value, f">= {target}", float(value) >= target))
    if "dramatiq" in peers.sleep_efficiency:
        efficiency = peers.sleep_efficiency["dramatiq"]
        out.append(Result("sleep", "Dramatiq's efficiency", f"{efficiency:.3f}"))
    # Against procrastinate's batch_defer timed in this run (see time_procrastinate_enqueue);
    # all in, against run.sh's enqueue figure when this run could not time it.
    alone = found.get(("bulk/procrastinate", "batch_defer"))
    all_in = found.get(("bulk/procrastinate", "new process, all in"))
    references = {
        "submit_many": seconds(alone) if alone else None,
        "new process, all in": (
            seconds(all_in) if all_in else peers.enqueue_s.get("procrastinate-exec10")
        ),
    }
    for backend in ("sqlite", "postgres"):
        for metric, reference in references.items():
            value = found.get((f"bulk/{backend}", metric))
            if value is None or not reference:
                continue
            ratio = reference / seconds(value)
            label = "x procrastinate's speed" + ("" if metric == "submit_many" else ", all in")
            out.append(Result(f"bulk/{backend}", label, f"{ratio:.2f}", "> 1", ratio > 1))
    return out


def describe(peers: PeerFigures) -> str:
    age_min = (time.time() - peers.taken_at) / 60
    figures = ", ".join(f"{peer} {tps:.0f}/s" for peer, tps in sorted(peers.noop_tps.items()))
    return f"peers' run of {age_min:.0f} min ago ({RESULTS}): 5000 no-op jobs {figures}"


# run.sh's enqueue.py, with the clock read once more after the import and the connection: the
# peer's batch_defer alone, to set beside Duplex's submit_many alone. The jobs are then removed
# as run.sh's bench.py removes them before each of its runs.
PROCRASTINATE_ENQUEUE = """
import sys, time
t0 = time.perf_counter()
import tasks_procrastinate as m
with m.app.open():
    t1 = time.perf_counter()
    n = int(sys.argv[1])
    for start in range(0, n, 1000):
        m.noop_task.batch_defer(*[{"i": i} for i in range(start, min(n, start + 1000))])
    t2 = time.perf_counter()
import psycopg
from common import DSN
with psycopg.connect(DSN, autocommit=True) as conn:
    conn.execute(
        "TRUNCATE procrastinate_events, procrastinate_periodic_defers, procrastinate_jobs"
        " RESTART IDENTITY CASCADE"
    )
print(t2 - t0, t2 - t1)
"""


def time_procrastinate_enqueue(count: int) -> tuple[float, float] | None:
    """(all in, batch_defer alone) in seconds for ``count`` jobs, or None without the peers'
    environment (``run.sh`` makes it)."""
    if not PEERS_PYTHON.exists() or not PEERS_DIR.is_dir():
        return None
    done = subprocess.run(
        [str(PEERS_PYTHON), "-c", PROCRASTINATE_ENQUEUE, str(count)],
        cwd=PEERS_DIR,
        env={**os.environ, "PYTHONPATH": str(PEERS_DIR)},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return None
    all_in, alone = (float(x) for x in done.stdout.split()[-2:])
    return all_in, alone
