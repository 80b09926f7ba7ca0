"""Throughput benchmarks of the real Worker on SQLite (issues 2 and 3).

    .venv/bin/python benchmarks/throughput.py [--only NAME ...] [--quick] [--strict-poll]

Scenarios: sleep, noop, memory, fanout, submit, tasks, bulk, postgres (these two need
PostgreSQL on 127.0.0.1:5432, and skip without it), observability (the no-op workload with
the HTTP port off, then on and scraped every second, alternating). Each uses a fresh,
migrated SQLite database in a temporary directory and a private handler registry; work is
submitted with ``create_task`` before the worker starts (submission is timed apart), then the
clock runs from just before ``Worker.start()`` until ``count_open_work`` reads 0. Figures
only: nothing here asserts.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select

from benchmarks import _common
from benchmarks import peers as peer_figures
from benchmarks._common import (
    Result,
    Run,
    Spans,
    Submission,
    bench_settings,
    database,
    fanout_template_text,
    fmt_s,
    fresh_database,
    independent_template_text,
    print_load,
    print_machine_info,
    print_table,
    quiet_logging,
    run_until_drained,
    submit,
    write_tasks,
)
from benchmarks.cpu import CpuSample, CpuUse
from duplex import Client
from duplex.handlers import HandlerRegistry, StepContext
from duplex.messages import DomainEvent
from duplex.storage.db import Database
from duplex.storage.models import workers as wt
from duplex.storage.models import workflow_step_transitions, workflow_steps
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import parse_template
from duplex.worker.wiring import Worker

CONCURRENCY = 10
ROOT = Path(__file__).resolve().parent.parent


def _noop(ctx: StepContext) -> None:
    return None


def _header(name: str, description: str) -> None:
    print(f"== {name}: {description}")


def _print_run(sub: Submission, run: Run, steps: int) -> None:
    if run.serve_error is not None:
        print(f"   !! worker failed: {type(run.serve_error).__name__}: {run.serve_error}")
    elif run.timed_out:
        print("   !! timed out before the work drained")
    print(
        f"   submit {fmt_s(sub.total_s)} (parse {fmt_s(sub.parse_s)}, write {fmt_s(sub.write_s)})"
        " - not in the figures below"
    )
    print(f"   start {fmt_s(run.start_s)}, drain {fmt_s(run.drain_s)}, stop {fmt_s(run.stop_s)}")
    print(
        f"   process CPU during the drain {run.cpu_s:.2f} s = {run.cpu_s / steps * 1000:.2f} ms"
        f"/step ({run.cpu_s / run.drain_s:.2f} cores)"
    )


# --- 1. sleep ------------------------------------------------------------------------------


def bench_sleep(quick: bool) -> list[Result]:
    steps, sleep_s = (100 if quick else 1000), 0.100
    ceiling = CONCURRENCY / sleep_s
    _header("sleep", f"{steps} independent steps sleeping {sleep_s * 1000:.0f} ms, c={CONCURRENCY}")
    registry, spans = HandlerRegistry(), Spans()
    registry.register("bench.sleep", spans.sleeper(sleep_s))
    with fresh_database() as db:
        sub = submit(db, independent_template_text(steps, "bench.sleep"))
        run = run_until_drained(
            db, bench_settings(db.url, concurrency=CONCURRENCY), registry, expected=steps
        )
    rate = steps / run.drain_s
    efficiency = rate / ceiling
    peers_clock = steps / spans.since_first_start(run) / ceiling
    _print_run(sub, run, steps)
    print(f"   {spans.describe(run, CONCURRENCY)}")
    print(
        f"   {rate:.1f} steps/s vs ceiling {ceiling:.0f} steps/s: efficiency {efficiency:.3f}"
        f" ({peers_clock:.3f} from the first handler's start, as the peers are timed)"
    )
    print()
    return [
        Result("sleep", "steps/s", f"{rate:.1f}", f"ceiling {ceiling:.0f}"),
        Result("sleep", "efficiency", f"{efficiency:.3f}", ">= 0.95", efficiency >= 0.95),
        Result("sleep", "efficiency, peers' clock", f"{peers_clock:.3f}"),
        Result("sleep", "slot occupancy", f"{spans.occupancy(CONCURRENCY):.3f}"),
    ]


# --- 2. noop -------------------------------------------------------------------------------


def bench_noop(quick: bool) -> list[Result]:
    steps = 500 if quick else 5000
    _header("noop", f"{steps} independent no-op steps, c={CONCURRENCY}, events delivered")
    registry = HandlerRegistry()
    registry.register("bench.noop", _noop)
    subscribers = SubscriberRegistry()
    seen = [0]
    all_seen = threading.Event()

    def count_completed(event: DomainEvent) -> None:
        # One delivery thread calls subscribers, so a plain counter is safe.
        seen[0] += 1
        if seen[0] >= steps:
            all_seen.set()

    subscribers.add("step.completed", count_completed)
    with fresh_database() as db:
        sub = submit(db, independent_template_text(steps, "bench.noop"))
        run = run_until_drained(
            db,
            bench_settings(db.url, concurrency=CONCURRENCY),
            registry,
            expected=steps,
            subscribers=subscribers,
            also_done=all_seen.is_set,
        )
    rate = steps / run.drain_s
    completion = run.final_status.get("completion", {})
    _print_run(sub, run, steps)
    print(
        f"   {rate:.0f} steps/s; step.completed seen {seen[0]}/{steps}; "
        f"committed {completion.get('committed')}"
    )
    print()
    return [
        Result("noop", "steps/s", f"{rate:.0f}", ">= 1500 (2 cores)", rate >= 1500),
        Result("noop", "CPU per step", f"{run.cpu_s / steps * 1000:.2f} ms"),
    ]


# --- 3. memory (in a subprocess, see benchmarks/memory.py) ---------------------------------


def bench_memory(quick: bool) -> list[Result]:
    from benchmarks.memory import run_memory

    return run_memory(quick)


# --- 4. fanout -----------------------------------------------------------------------------


def bench_fanout(quick: bool) -> list[Result]:
    steps, sleep_s = (100 if quick else 1000), 0.050
    middles = steps - 2
    ceiling_s = middles * sleep_s / CONCURRENCY + 2 * sleep_s
    _header(
        "fanout",
        f"root -> {middles} parallel -> join, {sleep_s * 1000:.0f} ms steps, c={CONCURRENCY}",
    )
    registry, spans = HandlerRegistry(), Spans()
    registry.register("bench.sleep", spans.sleeper(sleep_s))
    with fresh_database() as db:
        sub = submit(db, fanout_template_text(steps, "bench.sleep"))
        run = run_until_drained(
            db, bench_settings(db.url, concurrency=CONCURRENCY), registry, expected=steps
        )
        timeline = _join_timeline(db)
    efficiency = ceiling_s / run.drain_s
    peers_clock = ceiling_s / spans.since_first_start(run)
    _print_run(sub, run, steps)
    print(f"   {spans.describe(run, CONCURRENCY)}")
    print(
        f"   ceiling {fmt_s(ceiling_s)}: efficiency {efficiency:.3f}"
        f" ({peers_clock:.3f} from the first handler's start, as the peers are timed)"
    )
    delay = timeline["join_enqueued"] - timeline["last_middle_complete"]
    same = timeline["join_enqueued"] == timeline["last_middle_complete"]
    claim = timeline["join_claimed"] - timeline["join_enqueued"]
    print(
        f"   last middle complete -> join enqueued: {delay * 1000:.1f} ms "
        f"({'same commit batch' if same else 'different commit'}); "
        f"join enqueued -> claimed: {claim * 1000:.1f} ms"
    )
    print()
    return [
        Result("fanout", "efficiency", f"{efficiency:.3f}", ">= 0.95", efficiency >= 0.95),
        Result("fanout", "efficiency, peers' clock", f"{peers_clock:.3f}"),
        Result("fanout", "slot occupancy", f"{spans.occupancy(CONCURRENCY):.3f}"),
        Result(
            "fanout",
            "last middle -> join enqueued",
            f"{delay * 1000:.1f} ms" + (" (same batch)" if same else ""),
        ),
        Result("fanout", "join enqueued -> claimed", f"{claim * 1000:.1f} ms"),
    ]


def _join_timeline(db: Database) -> dict[str, float]:
    """Read the join's and the middles' transition times (seconds since the epoch)."""
    t, ws = workflow_step_transitions, workflow_steps
    join = select(ws.c.step_uuid).where(ws.c.name == "join").scalar_subquery()
    middles = select(ws.c.step_uuid).where(ws.c.name.like("m%"))
    queries = {
        "last_middle_complete": select(func.max(t.c.created_at)).where(
            t.c.step_uuid.in_(middles), t.c.from_state == "in_progress", t.c.to_state == "complete"
        ),
        "join_enqueued": select(func.min(t.c.created_at)).where(
            t.c.step_uuid == join, t.c.from_state == "pending", t.c.to_state == "enqueued"
        ),
        "join_claimed": select(func.min(t.c.created_at)).where(
            t.c.step_uuid == join, t.c.to_state == "in_progress"
        ),
    }
    with db.read() as conn:
        found = {key: conn.execute(q).scalar_one() for key, q in queries.items()}
    return {key: value.timestamp() if value else math.nan for key, value in found.items()}


# --- 5. submit -----------------------------------------------------------------------------


def bench_submit(quick: bool) -> list[Result]:
    steps, reps = (100 if quick else 1000), 3
    _header("submit", f"parse_template + create_task of a {steps}-step template, best of {reps}")
    results = []
    for shape, text in (
        ("independent", independent_template_text(steps, "bench.noop")),
        ("fanout", fanout_template_text(steps, "bench.noop")),
    ):
        parse_times, write_times, totals = [], [], []
        with fresh_database() as db:
            for _ in range(reps):
                t0 = time.perf_counter()
                template = parse_template(text)
                t1 = time.perf_counter()
                write_tasks(db, template, 1)
                t2 = time.perf_counter()
                parse_times.append(t1 - t0)
                write_times.append(t2 - t1)
                totals.append(t2 - t0)
        best = min(totals)
        print(
            f"   {shape:<11} best total {fmt_s(best)} "
            f"(parse best {fmt_s(min(parse_times))}, write best {fmt_s(min(write_times))}; "
            f"all totals {', '.join(fmt_s(x) for x in totals)})"
        )
        results += [
            Result(f"submit/{shape}", "parse", fmt_s(min(parse_times))),
            Result(f"submit/{shape}", "write", fmt_s(min(write_times))),
            Result(f"submit/{shape}", "total", fmt_s(best), "< 1 s", best < 1.0),
        ]
    print()
    return results


# --- 6. tasks: many single-step tasks -----------------------------------------------------


def bench_tasks(quick: bool) -> list[Result]:
    count = 500 if quick else 5000
    _header("tasks", f"{count} single-step no-op tasks (submit_many), c={CONCURRENCY}")
    registry = HandlerRegistry()
    registry.register("bench.noop", _noop)
    template = parse_template(independent_template_text(1, "bench.noop"))
    with fresh_database() as db:
        t0 = time.perf_counter()
        Client(db).submit_many(template, [{} for _ in range(count)])
        submit_s = time.perf_counter() - t0
        run = run_until_drained(
            db, bench_settings(db.url, concurrency=CONCURRENCY), registry, expected=count
        )
    rate = count / run.drain_s
    print(f"   submitted in {fmt_s(submit_s)}; drained in {fmt_s(run.drain_s)}: {rate:.0f} steps/s")
    print()
    return [
        Result("tasks", "steps/s", f"{rate:.0f}"),
        Result("tasks", "CPU per step", f"{run.cpu_s / count * 1000:.2f} ms"),
    ]


# --- 7. bulk: submit_many ------------------------------------------------------------------


def bench_bulk(quick: bool) -> list[Result]:
    count = 500 if quick else 5000
    _header("bulk", f"Client.submit_many of {count} single-step tasks, one transaction")
    template = parse_template(independent_template_text(1, "bench.noop"))
    results = []
    for backend in ("sqlite", "postgres"):
        with database(backend) as db:
            if db is None:
                print(f"   {backend}: not reachable, skipped")
                continue
            client = Client(db)
            t0 = time.perf_counter()
            client.submit_many(template, [{} for _ in range(count)])
            elapsed = time.perf_counter() - t0
        with database(backend) as db:  # empty again, as procrastinate's table is for its run
            assert db is not None
            cold = _cold_submit_many(db, count)
        print(
            f"   {backend:<8} {fmt_s(elapsed)} ({count / elapsed:.0f} tasks/s); in a new process,"
            f" imports and connecting included: {fmt_s(cold)}"
        )
        results.append(Result(f"bulk/{backend}", "submit_many", fmt_s(elapsed)))
        results.append(Result(f"bulk/{backend}", "new process, all in", fmt_s(cold)))
    procrastinate = peer_figures.time_procrastinate_enqueue(count)
    if procrastinate is None:
        print("   procrastinate: the peers' environment is missing (../shared/peers/run.sh)")
    else:
        all_in, alone = procrastinate
        print(
            f"   procrastinate batch_defer (chunks of 1000, as run.sh): {fmt_s(alone)};"
            f" in a new process, imports and connecting included: {fmt_s(all_in)}"
        )
        results.append(Result("bulk/procrastinate", "batch_defer", fmt_s(alone)))
        results.append(Result("bulk/procrastinate", "new process, all in", fmt_s(all_in)))
    print()
    return results


# Timed as the peers' enqueue.py times procrastinate's batch_defer: from a new process's first
# line, so importing the client and connecting count too (and nothing else: the template comes
# as text, not through the benchmark's own modules, which import the whole worker).
COLD_SUBMIT = """
import sys, time
t0 = time.time()
from duplex import Client
from duplex.templates import parse_template
with Client(sys.argv[1]) as client:
    client.submit_many(parse_template(sys.argv[3]), [{} for _ in range(int(sys.argv[2]))])
print(time.time() - t0)
"""


def _cold_submit_many(db: Database, count: int) -> float:
    # Bytecode cached, as pip leaves it for an installed package (and for the peers): with
    # PYTHONDONTWRITEBYTECODE set, as on these machines, an editable checkout would compile
    # every module of app/ at each start. The first, untimed run writes the cache.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    template = independent_template_text(1, "bench.noop")

    def run(rows: int) -> float:
        done = subprocess.run(
            [sys.executable, "-c", COLD_SUBMIT, db.url, str(rows), template],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return float(done.stdout.split()[-1])

    run(1)
    return run(count)


# --- 8. postgres: one and two worker processes ----------------------------------------------


# Rounds of one process then two, alternating: the ratio of two figures taken minutes apart on
# a shared machine says little, the median of pairs taken side by side says more.
POSTGRES_ROUNDS = 3


def bench_postgres(quick: bool) -> list[Result]:
    count = 500 if quick else 5000
    rounds = 1 if quick else POSTGRES_ROUNDS
    _header(
        "postgres",
        f"{count} single-step no-op tasks on PostgreSQL, `duplex run` processes, "
        f"{rounds} round(s) of 1 then 2",
    )
    print(
        "   the processes start on an empty queue; the tasks are submitted once every one has"
        " beaten, and wake them through NOTIFY"
    )
    template = parse_template(independent_template_text(1, "bench.noop"))
    runs: dict[int, list[ProcessRun]] = {1: [], 2: []}
    for _ in range(rounds):
        for processes in (1, 2):
            with database("postgres") as db:
                if db is None:
                    print("   PostgreSQL not reachable, skipped")
                    return []

                def submit_all(db: Database = db) -> None:
                    Client(db).submit_many(template, [{} for _ in range(count)])

                run = _run_processes(db, processes, concurrency=CONCURRENCY, submit=submit_all)
            runs[processes].append(run)
            workers_ms, postgres_ms, other_ms = run.cpu.per_step_ms(count)
            print(
                f"   {processes} process(es) x {CONCURRENCY} slots: {count / run.elapsed_s:.0f}/s;"
                f" CPU per step: workers {workers_ms:.3f} ms, PostgreSQL {postgres_ms:.3f} ms,"
                f" other {other_ms:.3f} ms; cores busy {run.cpu.busy_share:.0%};"
                f" first claims at +{', +'.join(f'{ms:.0f}' for ms in run.first_claims_ms)} ms"
            )
    rates = {p: statistics.median(count / r.elapsed_s for r in rs) for p, rs in runs.items()}
    # What every core busy at two processes' CPU per step would give: the most that more
    # processes can reach on this machine while the database server shares its cores.
    ceiling = statistics.median(r.cpu.ceiling(count) for r in runs[2])
    results = []
    for processes, rate in rates.items():
        print(f"   {processes} process(es): median {rate:.0f}/s")
        results.append(Result(f"postgres/{processes}p", "steps/s", f"{rate:.0f}"))
    print(
        f"   all {os.cpu_count()} cores busy at two processes' CPU per step: {ceiling:.0f}/s"
        f" = {ceiling / rates[1]:.2f}x one process; two processes reach"
        f" {rates[2] / ceiling:.2f} of it"
    )
    results.append(Result("postgres/2p", "all cores busy", f"{ceiling:.0f}"))
    print()
    return results


@dataclass
class ProcessRun:
    elapsed_s: float  # from the first claim to the last commit, as recorded in SQL
    cpu: CpuUse  # from the submission's end until the queue was empty
    first_claims_ms: list[float]  # each process's first claim, after the first of all


def _run_processes(
    db: Database, processes: int, *, concurrency: int, submit: Callable[[], None]
) -> ProcessRun:
    """Start ``duplex run`` processes on ``db``, submit once all are up, run until the queue
    is empty."""
    env = {
        **os.environ,
        "DUPLEX_DATABASE__URL": db.url,
        "DUPLEX_WORKER__HANDLER_MODULES": '["benchmarks.handlers"]',
        "DUPLEX_WORKER__MAX_CONCURRENT_HANDLERS": str(concurrency),
        # Beat soon after start, which says the worker is up (two beats a second cost little).
        "DUPLEX_WORKER__HEARTBEAT_INTERVAL_S": "0.5",
        # Idle workers learn of the submission at once, as several workers on PostgreSQL would.
        "DUPLEX_EVENT_SYSTEM__DEPLOYMENT_MODE": "hybrid",
        "DUPLEX_LOGGING__LEVEL": "WARNING",
        "DUPLEX_SETTINGS": str(ROOT / "benchmarks" / "empty_settings.toml"),
        "PYTHONPATH": str(ROOT),
    }
    workers = [
        subprocess.Popen([sys.executable, "-m", "duplex", "run"], env=env, cwd=ROOT)
        for _ in range(processes)
    ]
    pids = [worker.pid for worker in workers]
    try:
        # Start-up (about a second of imports) is not throughput, and two processes starting
        # apart would leave one running alone for a while.
        _wait_until_beating(db, workers)
        submit()
        before, t0 = CpuSample.take(pids), time.monotonic()
        while _common.open_work(db):
            time.sleep(0.05)
        cpu = CpuUse.between(before, CpuSample.take(pids), time.monotonic() - t0)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(60)
    t = workflow_step_transitions
    with db.read() as conn:
        firsts = (
            conn.execute(
                select(func.min(t.c.created_at))
                .where(t.c.to_state == "in_progress")
                .group_by(t.c.worker_id)
            )
            .scalars()
            .all()
        )
        last = conn.execute(select(func.max(workflow_steps.c.completed_at))).scalar_one()
    first = min(firsts)
    return ProcessRun(
        float((last - first).total_seconds()),
        cpu,
        sorted((f - first).total_seconds() * 1000 for f in firsts),
    )


def _wait_until_beating(db: Database, workers: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 60
    while True:
        if any(worker.poll() is not None for worker in workers):
            raise RuntimeError("a worker process exited before it was up")
        with db.read() as conn:
            beating = conn.execute(
                select(func.count()).where(wt.c.heartbeat_at > wt.c.started_at)
            ).scalar_one()
        if beating >= len(workers):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(workers) - beating} worker process(es) never beat")
        time.sleep(0.05)


# --- 9. observability: the HTTP port and scrapes on, against off, in the same run ----------


class _Scraper:
    """Scrape /metrics and /health/ready every ``every_s`` while a run drains."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.scrapes = 0
        self.client_cpu_s = 0.0
        # CPU time of the worker's HTTP threads (cheroot's), per thread, from the kernel.
        self._server_ns: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def server_cpu_s(self) -> float:
        return sum(self._server_ns.values()) / 1e9

    def _sample_server_threads(self) -> None:
        for thread in threading.enumerate():
            if not thread.name.startswith(("CP Server Thread", "duplex-http")):
                continue
            try:
                stat = Path(f"/proc/self/task/{thread.native_id}/schedstat").read_text()
            except OSError:
                continue
            self._server_ns[thread.native_id or 0] = int(stat.split()[0])

    def start(self, worker: Worker) -> None:
        assert worker.http is not None
        port = worker.http.port

        def scrape() -> None:
            while not self._stop.wait(self.every_s):
                cpu0 = time.thread_time()
                try:
                    for path in ("/metrics", "/health/ready"):
                        url = f"http://127.0.0.1:{port}{path}"
                        with urllib.request.urlopen(url, timeout=5) as answer:
                            answer.read()
                except OSError:  # the worker stopped (and closed its port) under the scrape
                    return
                self.client_cpu_s += time.thread_time() - cpu0
                self._sample_server_threads()
                self.scrapes += 1

        self._thread = threading.Thread(target=scrape, name="bench-scraper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def bench_observability(quick: bool) -> list[Result]:
    # Long enough for several scrapes per run (a no-op step takes well under a millisecond).
    steps = 2000 if quick else 20000
    rounds = 1 if quick else 6
    _header(
        "observability",
        f"{steps} independent no-op steps, c={CONCURRENCY}: HTTP port off and on (with "
        f"/metrics and /health/ready scraped every second); {rounds} round(s), ABBA order",
    )
    registry = HandlerRegistry()
    registry.register("bench.noop", _noop)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    # CPU per step of this process: what the port costs, less moved by other load than time.
    cpu_ms: dict[str, list[float]] = {"off": [], "on": []}
    serving_share: list[float] = []
    for round_ in range(rounds):
        # off-on, then on-off: a drift of the shared machine's load cancels out.
        for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
            scraper = _Scraper(every_s=1.0)
            with fresh_database() as db:
                submit(db, independent_template_text(steps, "bench.noop"))
                settings = bench_settings(db.url, concurrency=CONCURRENCY)
                if mode == "on":
                    settings = settings.model_copy(
                        update={
                            "observability": settings.observability.model_copy(
                                update={"http_port": 0}
                            )
                        }
                    )
                try:
                    run = run_until_drained(
                        db,
                        settings,
                        registry,
                        expected=steps,
                        on_started=scraper.start if mode == "on" else None,
                    )
                finally:
                    scraper.stop()
            rates[mode].append(steps / run.drain_s)
            cpu_ms[mode].append(run.cpu_s / steps * 1000)
            extra = ""
            if mode == "on":
                serving = scraper.server_cpu_s + scraper.client_cpu_s
                serving_share.append(serving / run.cpu_s * 100)
                extra = (
                    f", {scraper.scrapes} scrape(s): {scraper.server_cpu_s * 1000:.0f} ms CPU "
                    f"serving + {scraper.client_cpu_s * 1000:.0f} ms scraping = "
                    f"{serving_share[-1]:.2f}% of the process's CPU"
                )
            print(
                f"   {mode:>3}: {steps / run.drain_s:.0f} steps/s, "
                f"{cpu_ms[mode][-1]:.3f} ms CPU per step{extra}"
            )
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    cpu_off, cpu_on = statistics.median(cpu_ms["off"]), statistics.median(cpu_ms["on"])
    change = (on - off) / off * 100
    cpu_change = (cpu_on - cpu_off) / cpu_off * 100
    print(
        f"   median off {off:.0f} steps/s ({cpu_off:.3f} ms CPU per step), "
        f"on {on:.0f} steps/s ({cpu_on:.3f} ms): throughput {change:+.1f}%, CPU {cpu_change:+.1f}%"
    )
    share = statistics.median(serving_share)
    print(f"   the scrapes themselves (serving + client): {share:.2f}% of the CPU (median)")
    print()
    return [
        Result("observability", "scrapes' share of CPU", f"{share:.2f}%"),
        Result("observability", "steps/s, port off", f"{off:.0f}"),
        Result("observability", "steps/s, port on", f"{on:.0f}", "within 5% of off", change > -5),
        Result("observability", "CPU per step, off", f"{cpu_off:.3f} ms"),
        Result(
            "observability", "CPU per step, on", f"{cpu_on:.3f} ms", "within 5%", cpu_change < 5
        ),
    ]


SCENARIOS: dict[str, Callable[[bool], list[Result]]] = {
    "sleep": bench_sleep,
    "noop": bench_noop,
    "memory": bench_memory,
    "fanout": bench_fanout,
    "submit": bench_submit,
    "tasks": bench_tasks,
    "bulk": bench_bulk,
    "postgres": bench_postgres,
    "observability": bench_observability,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SCENARIOS),
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--quick", action="store_true", help="sizes shrunk 10x, for smoke runs")
    parser.add_argument(
        "--strict-poll",
        action="store_true",
        help="query count_open_work every 10 ms from the start (costs the worker GIL time)",
    )
    args = parser.parse_args(argv)
    quiet_logging()
    _common.STRICT_POLL = args.strict_poll
    print_machine_info()
    if args.strict_poll:
        print("(--strict-poll: count_open_work every 10 ms from the start)")
    if args.quick:
        print("(--quick: sizes shrunk 10x; figures are for smoke runs only)\n")
    results: list[Result] = []
    for name, bench in SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        results += bench(args.quick)
    print_load()
    print_table(results)
    if not args.quick:  # the peers ran full sizes: no ratios against a smoke run
        _print_ratios(results)
    return 0


def _print_ratios(results: list[Result]) -> None:
    peers = peer_figures.load()
    if peers is None:
        print(f"\nno peers' figures in {peer_figures.RESULTS}: ../shared/peers/run.sh makes them")
        return
    print(f"\nagainst the {peer_figures.describe(peers)}")
    print_table(peer_figures.ratios(results, peers))


if __name__ == "__main__":
    sys.exit(main())
