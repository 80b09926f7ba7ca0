"""Firing 1,000 schedules due at once: the time until every one has fired its task.

    .venv/bin/python benchmarks/schedules.py [--schedules N] [--firers K] [--batch B]

On SQLite (a fresh, migrated file) and on PostgreSQL (a fresh schema in
``$DUPLEX_TEST_POSTGRES_URL`` or postgresql+psycopg://postgres@127.0.0.1:5432/test, skipped
when unreachable): N schedules of a one-step template (every one with its own name, all
due at the same instant) are fired by K firers in threads of this process, each with a
database engine of its own, each running what a worker's firer runs
(``SchedulePoller.round``: ``[schedules] batch_size`` schedules per transaction, the task,
its fire row, its ``schedule.fired`` event and the advance of the schedule together). The
clock starts when the firers are released and stops when the last has run out of due
schedules; then the database is checked: N tasks, one per schedule. Figures only.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import database, print_machine_info, quiet_logging
from duplex.clock import utcnow
from duplex.observability.counters import ScheduleMetrics
from duplex.schedules.declaration import declare
from duplex.schedules.poller import SchedulePoller
from duplex.settings import DatabaseSettings, ScheduleSettings
from duplex.storage.db import Database
from duplex.storage.schedules import fired_tasks, save_schedule
from duplex.templates import parse_template

TEMPLATE = parse_template('name = "bench_tick"\n[[steps]]\nname = "only"\nhandler = "b.noop"\n')


def add_due_schedules(db: Database, n: int) -> None:
    """N hourly schedules whose next fire time is one instant, already past (within their
    catch-up window of a day)."""
    added_at = utcnow() - timedelta(hours=1)
    with db.write() as conn:
        for i in range(n):
            declaration = declare(name=f"s{i:05d}", every="1h", catchup="1d")
            save_schedule(conn, declaration, TEMPLATE, now=added_at)


def fire_all(db: Database, firers: int, batch: int) -> float:
    """Release ``firers`` firers at once; return the seconds until the last is done."""
    engines = [Database(DatabaseSettings(url=db.url)) for _ in range(firers)]
    gate = threading.Barrier(firers + 1)
    metrics = [ScheduleMetrics() for _ in range(firers)]

    def firer(i: int) -> None:
        poller = SchedulePoller(
            engines[i], f"bench-{i}", ScheduleSettings(batch_size=batch), metrics[i]
        )
        gate.wait()
        while poller.round():
            pass

    threads = [threading.Thread(target=firer, args=(i,)) for i in range(firers)]
    for thread in threads:
        thread.start()
    gate.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    took = time.perf_counter() - started
    for engine in engines:
        engine.dispose()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=1000)
    parser.add_argument("--firers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--batch", type=int, default=ScheduleSettings().batch_size)
    args = parser.parse_args()
    quiet_logging()
    print_machine_info()
    print(f"{args.schedules} schedules due at once, batch_size {args.batch}")
    for backend in ("sqlite", "postgresql"):
        for firers in args.firers:
            with database(backend) as db:
                if db is None:
                    print(f"  {backend:<10} skipped: not reachable")
                    break
                add_due_schedules(db, args.schedules)
                took = fire_all(db, firers, args.batch)
                with db.read() as conn:
                    fired = fired_tasks(conn)
                tasks = {task for _, _, task in fired}
                assert len(fired) == len(tasks) == args.schedules, (len(fired), len(tasks))
                print(
                    f"  {backend:<10} {firers} firer(s): {took:6.2f} s  "
                    f"({args.schedules / took:,.0f} fires/s)"
                )


if __name__ == "__main__":
    main()
