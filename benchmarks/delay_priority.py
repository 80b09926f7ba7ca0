"""Delayed starts and priority: what they cost the claim (issue 21).

    .venv/bin/python benchmarks/delay_priority.py [--quick] [--rounds N] [--only NAME ...]

Scenarios:

- ``claims``: the claim alone, as the StepExecutor makes it (one transaction per claim of
  10): 5,000 one-step tasks due now claimed with 100,000 one-step tasks scheduled a day ahead
  in the same namespace, against the same with none, on SQLite and PostgreSQL. Target: within
  10 %.
- ``delayed``: the no-op workload of ``throughput.py`` (W2: 5,000 independent no-op steps,
  c=10) with 100,000 one-step tasks scheduled a day ahead in the same namespace, against the
  same run with none, on SQLite and on PostgreSQL (skipped when PostgreSQL on 127.0.0.1:5432
  is not reachable; ``DUPLEX_TEST_POSTGRES_URL`` picks the database). Target: within 10 %.
- ``priority``: W2 with every step of priority 0 (priority off) against W2 with its steps
  spread over five priority levels (-2..2), on SQLite. Target: within 10 %.

Each figure is the median of ``--rounds`` runs (default 3), the two sides alternating so that
the machine's load falls on both. A W2 run starts a real Worker on a database holding the work
(the future tasks were written before) and stops the clock once every ready step is
committed (an in-memory count from the commit observer, then checked in SQL). Figures only:
nothing here asserts. ``--quick``: 1,000 steps and 20,000 future tasks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select, text

from benchmarks._common import (
    Result,
    bench_settings,
    database,
    print_load,
    print_machine_info,
    print_table,
    quiet_logging,
)
from duplex.clock import utcnow
from duplex.handlers import HandlerRegistry, StepContext
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.models import workflow_steps
from duplex.storage.results import CommitReport
from duplex.storage.submission import create_tasks
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import parse_template
from duplex.worker.wiring import Worker

CONCURRENCY = 10


def _noop(ctx: StepContext) -> None:
    return None


def w2_template(steps: int, *, levels: int = 1, name: str = "w2") -> str:
    """W2's one task of ``steps`` independent no-op steps; ``levels`` > 1 spreads the steps
    over that many priorities, centred on 0."""
    lines = [f'name = "{name}"']
    for i in range(steps):
        lines += ["[[steps]]", f'name = "s{i:06d}"', 'handler = "bench.noop"']
        if levels > 1:
            lines.append(f"priority = {i % levels - levels // 2}")
    return "\n".join(lines) + "\n"


def schedule_future(db: Database, count: int) -> float:
    """Write ``count`` one-step tasks that start a day from now; return the seconds it took."""
    template = parse_template('name = "later"\n[[steps]]\nname = "a"\nhandler = "bench.noop"\n')
    t0 = time.perf_counter()
    start = utcnow() + timedelta(days=1)
    for first in range(0, count, 10_000):
        with db.write() as conn:
            n = min(10_000, count - first)
            create_tasks(conn, template, [{}] * n, now=utcnow(), run_at=start)
    if db.url.startswith("postgresql"):
        # As a database that has lived with them would: the planner knows they are there.
        with db.write() as conn:
            conn.execute(text("ANALYZE workflow_steps"))
    return time.perf_counter() - t0


def run_w2(db: Database, template_text: str, steps: int, **worker: object) -> float:
    """Submit W2, run a worker until every one of its steps is committed; return steps/s.

    The tasks of earlier runs stay, complete: they are in no claimable range of the index."""
    with db.write() as conn:
        (task,) = create_tasks(conn, parse_template(template_text), [{}], now=utcnow())
    registry = HandlerRegistry()
    registry.register("bench.noop", _noop)
    committed = [0]
    done = threading.Event()

    def observe(report: CommitReport) -> None:
        committed[0] += len(report.applied)
        if committed[0] >= steps:
            done.set()

    w = Worker(
        bench_settings(str(db.url), concurrency=CONCURRENCY, **worker),
        db,
        registry=registry,
        subscribers=SubscriberRegistry(),
        observer=observe,
    )
    t0 = time.perf_counter()
    w.start()
    try:
        if not done.wait(600):
            raise RuntimeError("W2 did not finish in 10 minutes")
        elapsed = time.perf_counter() - t0
    finally:
        w.stop()
    with db.read() as conn:
        complete = conn.execute(
            select(func.count()).where(
                workflow_steps.c.state == "complete",
                workflow_steps.c.task_uuid == task,
            )
        ).scalar_one()
    assert complete == steps, f"{complete} of {steps} steps complete"
    return steps / elapsed


def alternate(rounds: int, a: Callable[[], float], b: Callable[[], float]) -> tuple[float, float]:
    """Run ``a`` and ``b`` ``rounds`` times each, alternating; return both medians."""
    ra: list[float] = []
    rb: list[float] = []
    for i in range(rounds):
        for run, into in ((a, ra), (b, rb)) if i % 2 == 0 else ((b, rb), (a, ra)):
            into.append(run())
    print(f"   runs: {[round(x) for x in ra]} vs {[round(x) for x in rb]}")
    return statistics.median(ra), statistics.median(rb)


def bench_delayed(quick: bool, rounds: int) -> list[Result]:
    steps, future = (1000, 20_000) if quick else (5000, 100_000)
    results: list[Result] = []
    for backend in BACKENDS:
        print(
            f"== delayed ({backend}): W2 ({steps} steps) with {future:,} tasks a day ahead vs none"
        )
        with database(backend) as empty, database(backend) as loaded:
            if empty is None or loaded is None:
                print("   skipped: PostgreSQL not reachable\n")
                continue
            print(f"   wrote {future:,} future tasks in {schedule_future(loaded, future):.1f} s")
            text = w2_template(steps)

            def without(db: Database = empty, text: str = text) -> float:
                return run_w2(db, text, steps)

            def with_future_tasks(db: Database = loaded, text: str = text) -> float:
                return run_w2(db, text, steps)

            base, with_future = alternate(rounds, without, with_future_tasks)
        ratio = with_future / base
        print(f"   {base:.0f} steps/s without, {with_future:.0f} with: {ratio:.1%}\n")
        results.append(
            Result(
                f"delayed {backend}",
                "steps/s with/without",
                f"{with_future:.0f}/{base:.0f} ({ratio:.0%})",
                ">= 90 %",
                ratio >= 0.9,
            )
        )
    return results


def claim_all(db: Database, ready: int, limit: int = 10) -> float:
    """Write ``ready`` one-step tasks due now, claim them all ``limit`` at a time, each claim a
    transaction of its own as the StepExecutor makes it; return claimed steps per second."""
    template = parse_template('name = "now"\n[[steps]]\nname = "a"\nhandler = "bench.noop"\n')
    with db.write() as conn:
        create_tasks(conn, template, [{}] * ready, now=utcnow())
    claimed = 0
    t0 = time.perf_counter()
    while claimed < ready:
        with db.write() as conn:
            got = claim_ready_steps(
                conn, worker_id="bench", namespaces=("default",), limit=limit, now=utcnow()
            )
        if not got:
            raise RuntimeError(f"only {claimed} of {ready} claimed")
        claimed += len(got)
    return claimed / (time.perf_counter() - t0)


def bench_claims(quick: bool, rounds: int) -> list[Result]:
    ready, future = (1000, 20_000) if quick else (5000, 100_000)
    results: list[Result] = []
    for backend in BACKENDS:
        print(
            f"== claims ({backend}): {ready} ready, 10 per claim, with {future:,} scheduled vs none"
        )
        with database(backend) as empty, database(backend) as loaded:
            if empty is None or loaded is None:
                print("   skipped: PostgreSQL not reachable\n")
                continue
            print(f"   wrote {future:,} future tasks in {schedule_future(loaded, future):.1f} s")

            def without(db: Database = empty) -> float:
                return claim_all(db, ready)

            def with_future_tasks(db: Database = loaded) -> float:
                return claim_all(db, ready)

            base, with_future = alternate(rounds, without, with_future_tasks)
        ratio = with_future / base
        print(f"   {base:.0f} claimed/s without, {with_future:.0f} with: {ratio:.1%}\n")
        results.append(
            Result(
                f"claims {backend}",
                "claimed/s with/without",
                f"{with_future:.0f}/{base:.0f} ({ratio:.0%})",
                ">= 90 %",
                ratio >= 0.9,
            )
        )
    return results


def bench_priority(quick: bool, rounds: int) -> list[Result]:
    steps = 1000 if quick else 5000
    print(f"== priority (sqlite): W2 ({steps} steps) all priority 0 vs five levels -2..2")
    with database("sqlite") as off_db, database("sqlite") as on_db:
        assert off_db is not None
        assert on_db is not None
        off_text, on_text = w2_template(steps), w2_template(steps, levels=5)
        off, on = alternate(
            rounds, lambda: run_w2(off_db, off_text, steps), lambda: run_w2(on_db, on_text, steps)
        )
    ratio = on / off
    print(f"   {off:.0f} steps/s off, {on:.0f} on: {ratio:.1%}\n")
    return [
        Result(
            "priority sqlite",
            "steps/s on/off",
            f"{on:.0f}/{off:.0f} ({ratio:.0%})",
            ">= 90 %",
            ratio >= 0.9,
        )
    ]


SCENARIOS = {"claims": bench_claims, "delayed": bench_delayed, "priority": bench_priority}
BACKENDS = ["sqlite", "postgresql"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), metavar="NAME")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for smoke runs")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side (default 3)")
    parser.add_argument(
        "--backend", action="append", choices=BACKENDS, help="delayed: only this database"
    )
    args = parser.parse_args(argv)
    if args.backend:
        BACKENDS[:] = args.backend
    quiet_logging()
    print_machine_info()
    if args.quick:
        print("(--quick: 1,000 steps, 20,000 future tasks; figures for smoke runs only)\n")
    results: list[Result] = []
    for name, bench in SCENARIOS.items():
        if not args.only or name in args.only:
            results += bench(args.quick, args.rounds)
    print_load()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
