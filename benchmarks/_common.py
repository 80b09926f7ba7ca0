"""Shared pieces of the benchmarks: machine info, fresh databases, templates, a timed run.

Benchmarks print figures; they never assert on timings (the machine is shared and noisy).
"""

from __future__ import annotations

import os
import platform
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy import text as sql  # noqa: E402

from duplex.clock import utcnow  # noqa: E402
from duplex.handlers import HandlerRegistry  # noqa: E402
from duplex.observability.logs import configure_logging  # noqa: E402
from duplex.settings import DatabaseSettings, LoggingSettings, Settings  # noqa: E402
from duplex.storage.db import WORKER_PING_AFTER_IDLE_S, Database  # noqa: E402
from duplex.storage.migrate import upgrade_to_head  # noqa: E402
from duplex.storage.queries import count_open_work  # noqa: E402
from duplex.storage.results import CommitReport  # noqa: E402
from duplex.storage.submission import create_task  # noqa: E402
from duplex.subscriptions import SubscriberRegistry  # noqa: E402
from duplex.templates import TaskTemplate, parse_template  # noqa: E402
from duplex.worker.wiring import Worker  # noqa: E402

POLL_S = 0.010


def quiet_logging() -> None:
    """Keep the worker's INFO lines out of the figures (warnings and errors still show)."""
    configure_logging(LoggingSettings(level="WARNING"))


def machine_info() -> dict[str, str]:
    """Describe the machine the figures were taken on."""
    try:
        usable = str(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        usable = "?"
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    from importlib.metadata import version

    return {
        "platform": platform.platform(),
        "cpu": f"{os.cpu_count()} logical, {usable} usable ({_cpu_model()})",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlite": sqlite3.sqlite_version,
        "libraries": f"SQLAlchemy {version('sqlalchemy')}, pykka {version('pykka')}",
        "load average": load,
    }


def _cpu_model() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "?"


def print_machine_info() -> None:
    print("Duplex benchmarks")
    for key, value in machine_info().items():
        print(f"  {key:<13} {value}")
    print()


@contextmanager
def fresh_database(prefix: str = "duplex-bench-") -> Iterator[Database]:
    """Yield a migrated SQLite database in a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        db = Database(DatabaseSettings(url=f"sqlite:///{Path(tmp) / 'bench.db'}"))
        try:
            upgrade_to_head(db)
            yield db
        finally:
            db.dispose()


@contextmanager
def database(backend: str) -> Iterator[Database | None]:
    """A fresh, migrated database of ``backend`` (``None`` when PostgreSQL is not reachable)."""
    if backend == "sqlite":
        with fresh_database() as db:
            yield db
        return
    url = os.environ.get(
        "DUPLEX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    schema = f"duplex_bench_{os.getpid()}"
    try:
        admin = create_engine(url)
        with admin.begin() as conn:
            conn.execute(sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            conn.execute(sql(f'CREATE SCHEMA "{schema}"'))
    except Exception:
        yield None
        return
    # As ``duplex run`` opens it: the in-process worker is measured as the real one.
    db = Database(
        DatabaseSettings(url=f"{url}?options=-csearch_path%3D{schema}"),
        ping_after_idle_s=WORKER_PING_AFTER_IDLE_S,
    )
    try:
        upgrade_to_head(db)
        yield db
    finally:
        db.dispose()
        with admin.begin() as conn:
            conn.execute(sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def bench_settings(url: str, *, concurrency: int, **worker: Any) -> Settings:
    """Settings built like the tests build them: explicit sections, no settings.toml."""
    return Settings(
        database={"url": url},
        worker={"max_concurrent_handlers": concurrency, **worker},
        event_system={"polling_interval_ms": 250},
    )


# --- templates -----------------------------------------------------------------------------


def independent_template_text(n: int, handler: str, *, name: str = "bench") -> str:
    """A template of ``n`` steps with no dependencies between them."""
    lines = [f'name = "{name}"']
    for i in range(n):
        lines += ["[[steps]]", f'name = "s{i:06d}"', f'handler = "{handler}"']
    return "\n".join(lines) + "\n"


def fanout_template_text(n: int, handler: str, *, name: str = "fanout") -> str:
    """A template of ``n`` steps: one root, ``n - 2`` parallel middles, one join."""
    middles = [f"m{i:06d}" for i in range(n - 2)]
    lines = [f'name = "{name}"', "[[steps]]", 'name = "root"', f'handler = "{handler}"']
    for middle in middles:
        lines += ["[[steps]]", f'name = "{middle}"', f'handler = "{handler}"']
        lines.append('depends_on = ["root"]')
    lines += ["[[steps]]", 'name = "join"', f'handler = "{handler}"']
    lines.append("depends_on = [" + ", ".join(f'"{m}"' for m in middles) + "]")
    return "\n".join(lines) + "\n"


def chain_template_text(n: int, handler: str, *, name: str = "chain") -> str:
    """A template of ``n`` steps in a line: each step depends on the one before it."""
    lines = [f'name = "{name}"']
    for i in range(n):
        lines += ["[[steps]]", f'name = "s{i:06d}"', f'handler = "{handler}"']
        if i:
            lines.append(f'depends_on = ["s{i - 1:06d}"]')
    return "\n".join(lines) + "\n"


@dataclass
class Submission:
    tasks: int
    steps: int
    parse_s: float
    write_s: float

    @property
    def total_s(self) -> float:
        return self.parse_s + self.write_s


def submit(db: Database, text: str, *, tasks: int = 1) -> Submission:
    """Parse ``text`` once and create ``tasks`` tasks from it in one write transaction."""
    t0 = time.perf_counter()
    template = parse_template(text)
    t1 = time.perf_counter()
    write_tasks(db, template, tasks)
    t2 = time.perf_counter()
    return Submission(tasks, tasks * len(template.steps), t1 - t0, t2 - t1)


def write_tasks(db: Database, template: TaskTemplate, tasks: int) -> None:
    """Create ``tasks`` tasks from ``template``, in one transaction (create_task batches rows)."""
    with db.write() as conn:
        for _ in range(tasks):
            create_task(conn, template, {}, now=utcnow())


# --- running the worker --------------------------------------------------------------------


@dataclass
class Run:
    """What one timed run of the worker measured."""

    start_s: float  # Worker.start() alone
    drain_s: float  # from just before start() until count_open_work == 0 (and extra done)
    stop_s: float  # Worker.stop()
    cpu_s: float  # CPU time of this process (all threads) during the drain
    t0: float  # perf_counter() when the clock started
    final_status: dict[str, Any] = field(default_factory=dict)
    timed_out: bool = False
    serve_error: BaseException | None = None


def open_work(db: Database, namespaces: tuple[str, ...] = ("default",)) -> int:
    with db.read() as conn:
        return count_open_work(conn, namespaces)


# Poll the database every 10 ms from the start (True), or only once the worker's own commit
# count says the expected steps are done (False: the default, see run_until_drained).
STRICT_POLL = False


def run_until_drained(
    db: Database,
    settings: Settings,
    registry: HandlerRegistry,
    *,
    expected: int,
    subscribers: SubscriberRegistry | None = None,
    observer: Callable[[CommitReport], None] | None = None,
    also_done: Callable[[], bool] | None = None,
    timeout_s: float = 600.0,
    on_started: Callable[[Worker], None] | None = None,
) -> Run:
    """Start a real Worker (serving in a thread, as ``duplex run`` does), time the drain, stop.

    The clock runs from just before ``Worker.start()`` until ``count_open_work`` reads 0 and
    ``also_done()`` holds, checked every 10 ms. Querying the database every 10 ms costs the
    worker about a tenth of its GIL time on a no-op workload, so by default the query is gated
    on an in-memory count of committed outcomes reaching ``expected`` (``STRICT_POLL`` turns
    the gate off); the end is still decided by ``count_open_work``.
    """
    committed = [0]

    def observe(report: CommitReport) -> None:
        committed[0] += len(report.applied)
        if observer is not None:
            observer(report)

    worker = Worker(
        settings,
        db,
        registry=registry,
        subscribers=subscribers or SubscriberRegistry(),
        observer=observe,
    )
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            worker.serve()
        except BaseException as exc:
            errors.append(exc)
            worker.stop_requested.set()

    cpu0, t0 = time.process_time(), time.perf_counter()
    worker.start()
    start_s = time.perf_counter() - t0
    if on_started is not None:
        on_started(worker)
    server = threading.Thread(target=serve, name="bench-serve", daemon=True)
    server.start()
    timed_out = False
    try:
        while True:
            gate = STRICT_POLL or committed[0] >= expected
            if gate and open_work(db) == 0 and (also_done is None or also_done()):
                break
            if errors or time.perf_counter() - t0 > timeout_s:
                timed_out = True
                break
            time.sleep(POLL_S)
        drain_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        worker.stop_requested.set()
        server.join(timeout=30)
        t1 = time.perf_counter()
        final = worker.stop()
        stop_s = time.perf_counter() - t1
    return Run(start_s, drain_s, stop_s, cpu_s, t0, final, timed_out, errors[0] if errors else None)


class Spans:
    """Handler start/end times (perf_counter), recorded by the handlers themselves."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def sleeper(self, seconds: float) -> Callable[[Any], None]:
        """Return a handler that sleeps ``seconds`` and records when it ran."""

        def handler(ctx: Any) -> None:
            start = time.perf_counter()
            time.sleep(seconds)
            with self._lock:
                self.spans.append((start, time.perf_counter()))

        return handler

    def occupancy(self, concurrency: int) -> float:
        """Return the share of slot time spent in handlers, first start to last end."""
        if not self.spans:
            return 0.0
        first = min(s for s, _ in self.spans)
        last = max(e for _, e in self.spans)
        return sum(e - s for s, e in self.spans) / (concurrency * (last - first))

    def since_first_start(self, run: Run) -> float:
        """Seconds from the first handler's start to the end of the drain: the clock the
        peers' benchmark (``../shared/peers/bench.py``) uses, which leaves start-up out."""
        return run.t0 + run.drain_s - min(s for s, _ in self.spans)

    def describe(self, run: Run, concurrency: int) -> str:
        """Say where the wall time went: ramp-up, slot occupancy, tail after the last handler."""
        if not self.spans:
            return "no handler ran"
        first = min(s for s, _ in self.spans)
        last = max(e for _, e in self.spans)
        return (
            f"first handler {fmt_s(first - run.t0)} after start; slot occupancy "
            f"{self.occupancy(concurrency):.3f} while running; tail "
            f"{fmt_s(run.t0 + run.drain_s - last)} after the last handler; peak parallelism "
            f"{self.peak()}"
        )

    def peak(self) -> int:
        edges = sorted([(s, 1) for s, _ in self.spans] + [(e, -1) for _, e in self.spans])
        level = top = 0
        for _, delta in edges:
            level += delta
            top = max(top, level)
        return top


# --- reporting -----------------------------------------------------------------------------


@dataclass
class Result:
    """One line of the summary table."""

    scenario: str
    metric: str
    value: str
    target: str = ""
    met: bool | None = None


def print_table(results: list[Result]) -> None:
    if not results:
        return
    headers = ("scenario", "metric", "value", "target", "met")
    rows = [
        (
            r.scenario,
            r.metric,
            r.value,
            r.target,
            "" if r.met is None else ("yes" if r.met else "NO"),
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def print_load() -> None:
    with suppress(OSError):
        print("load average at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_kib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"
