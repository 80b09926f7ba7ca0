"""Flow control: what concurrency keys and rate limits cost the no-op workload.

    .venv/bin/python benchmarks/flow_control.py [--rounds N] [--only sqlite|postgres ...]
        [--tasks N] [--keys N]

W2 as many tasks: ``--tasks`` (default 5,000) single-step no-op tasks, c=10 (the worker
settings of ``throughput.py``), their contexts spread over ``--keys`` (default 100) customers
(``{"customer": "c17"}``). Three profiles of the same tasks, side by side in one run:

- ``plain``: no concurrency key, no rate limit;
- ``keyed``: the step under ``concurrency = { key = "context.customer", limit = 10 }``: a key
  per customer, each of limit 10 (with 10 slots no key is ever full: what is measured is what
  counting a key's running attempts costs the claim). Target: within 15 % of ``plain``;
- ``rate``: the step under ``rate_limit = "bench"``, a limit of 1000000/s with a burst of
  1,000, far above any rate reached here (a claim of 10 is never deferred: what is measured
  is what taking the tokens costs the claim).

Each round runs every profile once (the order reversed every other round, so that a drift of
the shared machine's load falls on all of them), each on a fresh, migrated database: SQLite in
a temporary directory, and PostgreSQL (a schema of its own, dropped afterwards) from
``DUPLEX_TEST_POSTGRES_URL`` or postgresql+psycopg://postgres@127.0.0.1:5432/test, skipped
when not reachable. The tasks are written with ``create_tasks`` in one transaction before the
worker starts (timed apart); then the clock runs from just before ``Worker.start()`` until
``count_open_work`` reads 0 (``run_until_drained``).

Prints each run's steps/s, the CPU of this process per step, the submission's time and how
many steps a key held (``held by concurrency key``: expected 0), then per backend the median
steps/s of each profile and its ratio to ``plain``, and a summary table. Figures only: nothing
here asserts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select

from benchmarks._common import (
    Result,
    bench_settings,
    database,
    fmt_s,
    print_load,
    print_machine_info,
    print_table,
    quiet_logging,
    run_until_drained,
)
from duplex.clock import utcnow
from duplex.flow.rates import parse_rate
from duplex.handlers import HandlerRegistry, StepContext
from duplex.storage.db import Database
from duplex.storage.models import workflow_step_transitions, workflow_steps
from duplex.storage.rate_limits import set_limit
from duplex.storage.submission import create_tasks
from duplex.templates import parse_template

CONCURRENCY = 10
KEY_LIMIT = 10
# Far above the rate of a no-op step on one worker; the burst covers a claim of 10 at one
# instant (without it the second of them would wait its microsecond, deferred).
RATE = "1000000/s"
BURST = 1000
LIMIT_NAME = "bench"

PROFILES = ("plain", "keyed", "rate")
BACKENDS = ("sqlite", "postgres")


def _noop(ctx: StepContext) -> None:
    return None


def template_text(profile: str) -> str:
    """One no-op step; ``keyed`` puts it under a key per customer, ``rate`` under a limit."""
    lines = ['name = "flow-bench"', "[[steps]]", 'name = "s"', 'handler = "bench.noop"']
    if profile == "keyed":
        lines.append(f'concurrency = {{ key = "context.customer", limit = {KEY_LIMIT} }}')
    elif profile == "rate":
        lines.append(f'rate_limit = "{LIMIT_NAME}"')
    return "\n".join(lines) + "\n"


@dataclass
class Figure:
    """What one run of one profile measured."""

    rate: float  # steps/s
    cpu_ms: float  # CPU of this process per step, during the drain
    submit_s: float  # create_tasks, not in the rate
    held: int  # steps a concurrency key held (moved to waiting)
    complete: int  # steps complete at the end
    problem: str = ""


def run_profile(backend: str, profile: str, tasks: int, keys: int) -> Figure | None:
    """Write ``tasks`` one-step tasks of ``profile`` on a fresh database of ``backend``, drain
    them with a real Worker; None when the database is not reachable."""
    registry = HandlerRegistry()
    registry.register("bench.noop", _noop)
    template = parse_template(template_text(profile))
    contexts = [{"customer": f"c{i % keys}"} for i in range(tasks)]
    with database(backend) as db:
        if db is None:
            return None
        if profile == "rate":
            with db.write() as conn:
                rate = parse_rate(RATE, burst=BURST)
                set_limit(conn, LIMIT_NAME, rate, now=utcnow(), operator="bench")
        t0 = time.perf_counter()
        with db.write() as conn:
            create_tasks(conn, template, contexts, now=utcnow())
        submit_s = time.perf_counter() - t0
        run = run_until_drained(
            db, bench_settings(db.url, concurrency=CONCURRENCY), registry, expected=tasks
        )
        held, complete = _counts(db)
    problem = ""
    if run.serve_error is not None:
        problem = f"worker failed: {type(run.serve_error).__name__}: {run.serve_error}"
    elif run.timed_out:
        problem = "timed out before the work drained"
    elif complete != tasks:
        problem = f"{complete} of {tasks} steps complete"
    return Figure(tasks / run.drain_s, run.cpu_s / tasks * 1000, submit_s, held, complete, problem)


def _counts(db: Database) -> tuple[int, int]:
    """Steps held by a concurrency key at some point, and steps complete."""
    t, ws = workflow_step_transitions, workflow_steps
    with db.read() as conn:
        held = conn.execute(
            select(func.count(func.distinct(t.c.step_uuid))).where(
                t.c.reason.like("held by concurrency key%")
            )
        ).scalar_one()
        complete = conn.execute(select(func.count()).where(ws.c.state == "complete")).scalar_one()
    return int(held), int(complete)


def bench_backend(backend: str, rounds: int, tasks: int, keys: int) -> list[Result]:
    print(
        f"== {backend}: {tasks} single-step no-op tasks over {keys} customers, c={CONCURRENCY};"
        f" plain / keyed (limit {KEY_LIMIT} per customer) / rate ({RATE}, burst {BURST});"
        f" {rounds} round(s)"
    )
    figures: dict[str, list[Figure]] = {p: [] for p in PROFILES}
    for round_ in range(rounds):
        order = PROFILES if round_ % 2 == 0 else tuple(reversed(PROFILES))
        for profile in order:
            figure = run_profile(backend, profile, tasks, keys)
            if figure is None:
                print("   PostgreSQL not reachable (DUPLEX_TEST_POSTGRES_URL), skipped\n")
                return []
            figures[profile].append(figure)
            if figure.problem:
                print(f"   !! {profile}: {figure.problem}")
            print(
                f"   round {round_ + 1} {profile:<5}: {figure.rate:6.0f} steps/s,"
                f" {figure.cpu_ms:.3f} ms CPU/step; submit {fmt_s(figure.submit_s)};"
                f" held {figure.held}"
            )
    medians = {p: statistics.median(f.rate for f in fs) for p, fs in figures.items()}
    cpu = {p: statistics.median(f.cpu_ms for f in fs) for p, fs in figures.items()}
    plain = medians["plain"]
    results: list[Result] = []
    for profile in PROFILES:
        ratio = medians[profile] / plain
        runs = ", ".join(f"{f.rate:.0f}" for f in figures[profile])
        print(
            f"   median {profile:<5}: {medians[profile]:6.0f} steps/s ({runs}),"
            f" {cpu[profile]:.3f} ms CPU/step"
            + ("" if profile == "plain" else f"; {profile}/plain {ratio:.1%}")
        )
        if profile == "plain":
            results.append(Result(f"{backend} plain", "steps/s", f"{plain:.0f}"))
        else:
            target, met = ("within 15 %", ratio >= 0.85) if profile == "keyed" else ("", None)
            results.append(
                Result(
                    f"{backend} {profile}",
                    f"steps/s {profile}/plain",
                    f"{medians[profile]:.0f}/{plain:.0f} ({ratio:.0%})",
                    target,
                    met,
                )
            )
    print()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--only", action="append", choices=BACKENDS, help="only this database (repeatable)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs per profile (default 3)")
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per run (default 5000)")
    parser.add_argument(
        "--keys", type=int, default=100, help="customers the tasks spread over (default 100)"
    )
    args = parser.parse_args(argv)
    quiet_logging()
    print_machine_info()
    results: list[Result] = []
    for backend in BACKENDS:
        if not args.only or backend in args.only:
            results += bench_backend(backend, args.rounds, args.tasks, args.keys)
    print_load()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
