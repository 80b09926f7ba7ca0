"""Memory benchmark: the worker's RSS while it works through a 100,000-step backlog.

    .venv/bin/python benchmarks/memory.py [--quick]
    (also run by ``benchmarks/throughput.py --only memory``)

The backlog is written by this (parent) process; the worker runs in a child process so the
RSS sampled from ``/proc/<pid>/status`` every 100 ms is the worker's own.
docs/architecture.md (Guarantee 5) promises that memory is bounded by what is claimed and
awaiting commit, not by the backlog, so the figures after 10k, 50k and all steps should stay
flat. Figures only: nothing here asserts.
"""

from __future__ import annotations

import argparse
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    Result,
    bench_settings,
    fmt_kib,
    fmt_s,
    fresh_database,
    independent_template_text,
    print_load,
    print_machine_info,
    print_table,
    quiet_logging,
    write_tasks,
)
from duplex.handlers import HandlerRegistry, StepContext
from duplex.settings import DatabaseSettings, WorkerSettings
from duplex.storage.db import Database
from duplex.storage.results import CommitReport
from duplex.subscriptions import SubscriberRegistry
from duplex.templates import parse_template
from duplex.worker.wiring import Worker

STEPS_PER_TASK = 100
TASKS_PER_TRANSACTION = 100
SAMPLE_S = 0.100
PROGRESS_S = 0.050
STATUS_S = 0.5
TIMELINE_S = 5.0
CONCURRENCY = 10


# --- the parent: write the backlog, start the child, sample its RSS ----------------------


def proc_status(pid: int) -> dict[str, int]:
    """Return the ``Vm*`` fields of ``/proc/<pid>/status`` in KiB (empty once it has exited)."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key.startswith("Vm") and rest.strip().endswith("kB"):
                    fields[key] = int(rest.split()[0])
    except OSError:
        pass
    return fields


@dataclass
class Sample:
    at_s: float
    rss_kib: int
    processed: int
    buffered: int  # results waiting in the CompletionProcessor for a commit


@dataclass
class ChildRun:
    samples: list[Sample] = field(default_factory=list)
    before_start_kib: int = 0
    after_start_kib: int = 0
    end_kib: int = 0
    hwm_kib: int = 0
    processed: int = 0
    elapsed_s: float = 0.0
    finished: bool = False
    stop_s: float = 0.0
    problem: str = ""


def run_child(url: str, total: int, budget_s: float) -> ChildRun:
    """Run the worker in a child process and sample its RSS until it is done or out of time."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        url,
        "--total",
        str(total),
        "--budget",
        str(budget_s),
    ]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None
    assert child.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    latest = [0, 0]

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("progress "):
                latest[:] = [int(x) for x in line.split()[1:3]]
            else:
                lines.put(line.strip())
        lines.put("eof")

    threading.Thread(target=read, name="memory-child-reader", daemon=True).start()
    result = ChildRun()

    def next_line(timeout_s: float) -> str | None:
        try:
            return lines.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def expect(prefix: str, timeout_s: float) -> list[str]:
        line = next_line(timeout_s)
        if line is None:
            raise RuntimeError(f"child said nothing for {timeout_s:.0f} s (wanted {prefix!r})")
        if not line.startswith(prefix):
            raise RuntimeError(f"child said {line!r}, wanted {prefix!r}")
        return line.split()[1:]

    try:
        expect("ready", 60)
        result.before_start_kib = proc_status(child.pid).get("VmRSS", 0)
        child.stdin.write("go\n")
        child.stdin.flush()
        expect("started", 60)
        t0 = time.perf_counter()
        result.after_start_kib = proc_status(child.pid).get("VmRSS", 0)
        deadline = t0 + budget_s + 30
        finished: list[str] | None = None
        while finished is None and time.perf_counter() < deadline:
            rss = proc_status(child.pid).get("VmRSS", 0)
            result.samples.append(Sample(time.perf_counter() - t0, rss, *latest))
            line = next_line(SAMPLE_S)
            if line is None:
                continue
            if not line.startswith("finished"):
                raise RuntimeError(f"child said {line!r}, wanted 'finished'")
            finished = line.split()[1:]
        status = proc_status(child.pid)
        result.end_kib, result.hwm_kib = status.get("VmRSS", 0), status.get("VmHWM", 0)
        if finished is None:
            raise RuntimeError("child did not finish within its budget")
        result.processed, result.elapsed_s = int(finished[0]), float(finished[1])
        result.finished = result.processed >= total
        child.stdin.write("stop\n")
        child.stdin.flush()
        result.stop_s = float(expect("stopped", 60)[0])
    except RuntimeError as exc:
        result.problem = str(exc)
    finally:
        if child.poll() is None:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return result


def _at(samples: list[Sample], processed: int) -> Sample | None:
    """Return the first sample taken once ``processed`` steps were done."""
    return next((s for s in samples if s.processed >= processed), None)


def run_memory(quick: bool) -> list[Result]:
    total = 10_000 if quick else 100_000
    budget_s = 15.0 if quick else 240.0
    tasks = total // STEPS_PER_TASK
    print(
        f"== memory: worker RSS over a {total}-step backlog "
        f"({tasks} tasks x {STEPS_PER_TASK} no-op steps), c={CONCURRENCY}, budget {budget_s:.0f} s"
    )
    template = parse_template(independent_template_text(STEPS_PER_TASK, "bench.noop"))
    with fresh_database() as db:
        t0 = time.perf_counter()
        for start in range(0, tasks, TASKS_PER_TRANSACTION):
            write_tasks(db, template, min(TASKS_PER_TRANSACTION, tasks - start))
        insert_s = time.perf_counter() - t0
        db.dispose()
        print(f"   backlog written in {fmt_s(insert_s)} ({total / insert_s:.0f} steps/s)")
        run = run_child(db.url, total, budget_s)
    if run.problem:
        print(f"   !! {run.problem}")
    marks = [(f"after {n // 1000}k", _at(run.samples, n)) for n in (total // 10, total // 2)]
    print(f"   RSS before start {fmt_kib(run.before_start_kib)}")
    print(f"   RSS after start  {fmt_kib(run.after_start_kib)}")
    for label, sample in marks:
        where = f"{fmt_kib(sample.rss_kib)} (t={sample.at_s:.1f} s)" if sample else "not reached"
        print(f"   RSS {label:<12} {where}")
    print(f"   RSS at the end   {fmt_kib(run.end_kib)}; peak (VmHWM) {fmt_kib(run.hwm_kib)}")
    rate = run.processed / run.elapsed_s if run.elapsed_s else 0.0
    state = "all" if run.finished else "budget reached"
    print(
        f"   processed {run.processed}/{total} in {run.elapsed_s:.1f} s ({state}; "
        f"{rate:.0f} steps/s); stop took {fmt_s(run.stop_s)}"
    )
    timeline, next_at = [], 0.0
    for sample in run.samples:
        if sample.at_s >= next_at:
            timeline.append(sample)
            next_at += TIMELINE_S
    print(
        "   timeline (t: RSS, processed, buffered results): "
        + "; ".join(
            f"{s.at_s:.0f}s: {s.rss_kib / 1024:.1f} MiB, {s.processed}, {s.buffered}"
            for s in timeline
        )
    )
    most_buffered = max((s.buffered for s in run.samples), default=0)
    # Slots are freed before results are committed (guarantee 4), so results may wait for a
    # commit beyond what is claimed; once commit_batch_size of them wait, intake pauses.
    defaults = WorkerSettings()
    bound = defaults.commit_batch_size + CONCURRENCY + defaults.prefetch
    print(f"   most results buffered for commit at once: {most_buffered}")
    # Warm-up (imports, pools, caches) ends at the 10% mark or after 5 s, whichever is first.
    warm = next((s for s in run.samples if s.processed >= total // 10 or s.at_s >= 5.0), None)
    growth = run.end_kib - warm.rss_kib if warm else None
    if warm is not None and growth is not None:
        print(
            f"   growth after warm-up (t={warm.at_s:.1f} s, {warm.processed} steps) to the end: "
            f"{growth / 1024:+.1f} MiB"
        )
    print()
    results = [
        Result("memory", "RSS after start", fmt_kib(run.after_start_kib)),
        *(
            Result("memory", f"RSS {label}", fmt_kib(s.rss_kib) if s else "not reached")
            for label, s in marks
        ),
        Result("memory", "RSS end / peak", f"{fmt_kib(run.end_kib)} / {fmt_kib(run.hwm_kib)}"),
        Result("memory", "processed", f"{run.processed}/{total} ({rate:.0f}/s)"),
        Result(
            "memory",
            "max results buffered",
            str(most_buffered),
            f"<= {bound} (batch + slots + prefetch)",
            most_buffered <= bound,
        ),
    ]
    if growth is not None:
        results.append(
            Result(
                "memory",
                "growth after warm-up",
                f"{growth / 1024:+.1f} MiB",
                "flat (< 10 MiB)",
                growth < 10 * 1024,
            )
        )
    return results


# --- the child: the worker itself ----------------------------------------------------------


def _noop(ctx: StepContext) -> None:
    return None


def child_main(url: str, total: int, budget_s: float) -> int:
    """Run a real Worker on ``url`` until ``total`` steps are committed or the budget is spent."""
    quiet_logging()
    db = Database(DatabaseSettings(url=url))
    registry = HandlerRegistry()
    registry.register("bench.noop", _noop)
    processed = [0]

    def observe(report: CommitReport) -> None:
        processed[0] += len(report.applied)

    worker = Worker(
        bench_settings(url, concurrency=CONCURRENCY),
        db,
        registry=registry,
        subscribers=SubscriberRegistry(),
        observer=observe,
    )
    print("ready", flush=True)
    sys.stdin.readline()
    worker.start()
    server = threading.Thread(target=worker.serve, name="memory-serve", daemon=True)
    server.start()
    t0 = time.perf_counter()
    print("started", flush=True)
    buffered, next_status = 0, t0
    while processed[0] < total and time.perf_counter() - t0 < budget_s and server.is_alive():
        if time.perf_counter() >= next_status:
            # An ask of the CompletionProcessor: cheap, but not every 50 ms.
            buffered = worker.status()["completion"]["buffered"]
            next_status += STATUS_S
        print(f"progress {processed[0]} {buffered}", flush=True)
        time.sleep(PROGRESS_S)
    print(f"progress {processed[0]} {buffered}", flush=True)
    print(f"finished {processed[0]} {time.perf_counter() - t0:.3f}", flush=True)
    sys.stdin.readline()
    worker.stop_requested.set()
    server.join(timeout=30)
    t1 = time.perf_counter()
    worker.stop()
    print(f"stopped {time.perf_counter() - t1:.3f}", flush=True)
    db.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Worker RSS over a 100k-step backlog.")
    parser.add_argument("--quick", action="store_true", help="10k steps, 15 s budget")
    parser.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, default=100_000, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=240.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.total, args.budget)
    quiet_logging()
    print_machine_info()
    results = run_memory(args.quick)
    print_load()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
