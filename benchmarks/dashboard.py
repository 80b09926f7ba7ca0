"""Dashboard benchmarks (issue 10): page render times on a big history.

    .venv/bin/python benchmarks/dashboard.py [--quick] [--backend sqlite|postgres ...]

The history: 100k single-step tasks written with ``Client.submit_many`` (then set to
complete in SQL, but for a few hundred in error and a few hundred still enqueued), and one
task of 1000 steps (a root, 998 parallel steps, a join) run by a real worker, so that it
has its transitions and events. The dashboard is served by the real HTTP stack on a free
port, and each page is fetched over HTTP: 3 warm-up requests, then 15 timed ones (median
and the slowest). The time is the whole request, as a browser waits for it. Figures only:
nothing here asserts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import select, update

from benchmarks._common import (
    Result,
    bench_settings,
    database,
    fanout_template_text,
    independent_template_text,
    print_load,
    print_machine_info,
    print_table,
    quiet_logging,
    run_until_drained,
)
from duplex import Client
from duplex.clock import utcnow
from duplex.dashboard import Dashboard
from duplex.handlers import HandlerRegistry, StepContext
from duplex.observability.http import HttpServer
from duplex.settings import Settings
from duplex.storage.db import Database
from duplex.storage.models import tasks, workflow_steps
from duplex.templates import parse_template

WARM_UP, TIMED = 3, 15
TARGET_MS = 500.0


def _noop(ctx: StepContext) -> None:
    return None


def build_history(db: Database, count: int, big_steps: int) -> tuple[str, str]:
    """Write the history; return the big task's uuid and one of its middle steps' uuid."""
    t0 = time.perf_counter()
    client = Client(db)
    single = parse_template(independent_template_text(1, "bench.noop", name="single"))
    chunk = 5000
    for start in range(0, count, chunk):
        client.submit_many(single, [{"n": start + i} for i in range(min(chunk, count - start))])
    with db.write() as conn:
        now = utcnow()
        conn.execute(update(workflow_steps).values(state="complete", completed_at=now))
        conn.execute(update(tasks).values(state="complete", completed_at=now))
        # A few hundred tasks failed, a few hundred still to run: the counts are not all one.
        recent = list(
            conn.execute(
                select(tasks.c.task_uuid).order_by(tasks.c.created_at.desc()).limit(600)
            ).scalars()
        )
        failed, waiting = recent[:300], recent[300:]
        conn.execute(
            update(workflow_steps)
            .where(workflow_steps.c.task_uuid.in_(failed))
            .values(state="error", error={"error_type": "handler_error", "message": "boom"})
        )
        conn.execute(update(tasks).where(tasks.c.task_uuid.in_(failed)).values(state="error"))
        conn.execute(
            update(workflow_steps)
            .where(workflow_steps.c.task_uuid.in_(waiting))
            .values(state="enqueued", completed_at=None)
        )
        conn.execute(
            update(tasks).where(tasks.c.task_uuid.in_(waiting)).values(state="in_progress")
        )
    written = time.perf_counter() - t0
    big = client.submit(parse_template(fanout_template_text(big_steps, "bench.noop")), {})
    registry = HandlerRegistry()
    registry.register("bench.noop", _noop)
    settings = bench_settings(db.url, concurrency=10, namespaces=("default",))
    # Only the big task runs: the waiting single-step tasks are in another namespace.
    with db.write() as conn:
        conn.execute(
            update(workflow_steps)
            .where(workflow_steps.c.task_uuid.in_(waiting))
            .values(namespace="parked")
        )
    run = run_until_drained(db, settings, registry, expected=big_steps)
    print(
        f"   history: {count} tasks written in {written:.1f}s; "
        f"the {big_steps}-step task ran in {run.drain_s:.1f}s"
    )
    with db.read() as conn:
        middle = conn.execute(
            select(workflow_steps.c.step_uuid).where(
                workflow_steps.c.task_uuid == big,
                workflow_steps.c.name == f"m{(big_steps - 2) // 2:06d}",
            )
        ).scalar_one()
    return big, middle


def time_page(base: str, path: str, *, live: bool = False) -> tuple[float, float, int]:
    """Median and slowest milliseconds of GET ``path``, and the body's size."""
    headers = {"X-Duplex-Live": "1"} if live else {}
    times, size = [], 0
    for i in range(WARM_UP + TIMED):
        request = urllib.request.Request(base + path, headers=headers)
        t0 = time.perf_counter()
        with urllib.request.urlopen(request, timeout=60) as answer:
            body = answer.read()
        elapsed = (time.perf_counter() - t0) * 1000
        if i >= WARM_UP:
            times.append(elapsed)
        size = len(body)
    return statistics.median(times), max(times), size


def bench_backend(backend: str, count: int, big_steps: int) -> list[Result]:
    print(f"== {backend}: {count} tasks, one of {big_steps} steps")
    results: list[Result] = []
    with database(backend) as db:
        if db is None:
            print("   PostgreSQL not reachable, skipped\n")
            return []
        big, middle = build_history(db, count, big_steps)
        settings = Settings(database={"url": db.url})
        server = HttpServer("127.0.0.1", 0, Dashboard(settings, db), threads=4)
        server.start()
        base = f"http://127.0.0.1:{server.port}"
        try:
            with db.read() as conn:
                deep = conn.execute(
                    select(tasks.c.created_at, tasks.c.task_uuid)
                    .order_by(tasks.c.created_at.desc(), tasks.c.task_uuid.desc())
                    .offset(count // 2)
                    .limit(1)
                ).one()
            cursor = urllib.parse.quote(f"{deep.created_at.isoformat()}~{deep.task_uuid}")
            pages = [
                ("task list, first page", "/tasks", False),
                ("task list, live part", "/tasks", True),
                (
                    "task list, status blocked_by_failures",
                    "/tasks?status=blocked_by_failures",
                    False,
                ),
                ("task list, template filter", "/tasks?name=single&state=error", False),
                (f"task list, page at task {count // 2}", f"/tasks?before={cursor}", False),
                (f"task page, {big_steps} steps", f"/tasks/{big}", False),
                (f"task page, {big_steps} steps, live part", f"/tasks/{big}", True),
                ("step page", f"/steps/{middle}", False),
                ("workers", "/workers", False),
            ]
            for label, path, live in pages:
                median, slowest, size = time_page(base, path, live=live)
                print(
                    f"   {label:<44} median {median:7.1f} ms, slowest {slowest:7.1f} ms, "
                    f"{size / 1024:6.0f} KiB"
                )
                results.append(
                    Result(
                        f"{backend}: {label}",
                        "ms (median)",
                        f"{median:.0f}",
                        f"< {TARGET_MS:.0f}",
                        median < TARGET_MS,
                    )
                )
        finally:
            server.stop()
    print()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k tasks and 200 steps")
    parser.add_argument(
        "--backend",
        action="append",
        choices=("sqlite", "postgres"),
        help="run only this backend (repeatable; default both)",
    )
    args = parser.parse_args(argv)
    quiet_logging()
    print_machine_info()
    count, big_steps = (10_000, 200) if args.quick else (100_000, 1000)
    results = []
    for backend in args.backend or ("sqlite", "postgres"):
        results += bench_backend(backend, count, big_steps)
    print_table(results)
    print_load()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
