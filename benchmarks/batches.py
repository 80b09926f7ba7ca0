"""Batches made at run time against the same steps declared statically (docs/workflows.md).

    .venv/bin/python benchmarks/batches.py [--rounds N] [--items N] [--only sqlite|postgres]
                                           [--profile batch|static]

Scenarios, concurrency 10 (``worker.max_concurrent_handlers``), on SQLite and on PostgreSQL
(``DUPLEX_TEST_POSTGRES_URL``, default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``;
skipped when it is not reachable):

- **batch**: one task, ``split`` (a batch step returning ``Batch(range(N))``) -> ``item[i]``
  (each returns its item) -> ``total`` (sums every result through
  ``ctx.batch_results("item", page_size=500)``);
- **static**: one task of N + 2 steps written in the template: ``root`` -> ``s000000`` ...
  (each with ``inputs = { item = i }``, the same handler) -> ``total`` (depends on all of them,
  sums ``ctx.dependency_results``).

Each run is a child process of its own (a fresh database, a clean heap and RSS), rounds
alternate batch and static; the clock runs from just before ``Worker.start()`` until
``count_open_work`` reads 0 (so the batch's figure includes the commit that creates its N
items; the static task's submission, written before the worker starts, is reported apart).
A thread samples the process's RSS (``/proc/self/status``) every 100 ms. A last run per
database times the convergence's read of the N results with ``tracemalloc``: page by page
(``page_size=500``) against all at once (``page_size=N``). Figures only: nothing asserts.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import select

from benchmarks._common import (
    Result,
    bench_settings,
    database,
    fmt_kib,
    fmt_s,
    print_load,
    print_machine_info,
    print_table,
    quiet_logging,
    run_until_drained,
)
from duplex import Batch
from duplex.clock import utcnow
from duplex.handlers import HandlerRegistry, StepContext
from duplex.storage.models import workflow_steps
from duplex.storage.results import CommitReport
from duplex.storage.submission import create_task
from duplex.templates import parse_template

CONCURRENCY = 10
ITEMS = 10_000
PAGE_SIZE = 500
ROUNDS = 3
SAMPLE_S = 0.100
VARIANTS = ("batch", "static")

BATCH_TEMPLATE = """
name = "bench_batch"
[[steps]]
name = "split"
kind = "batch"
handler = "bench.batch_split"
worker = "item"
inputs = {{ n = {items} }}
[[steps]]
name = "item"
handler = "bench.batch_item"
depends_on = ["split"]
[[steps]]
name = "total"
handler = "bench.batch_total"
depends_on = ["item"]
"""


def static_template_text(items: int) -> str:
    """The batch's shape written out: root -> ``items`` steps (each with its item as an
    input) -> total, which depends on every one of them."""
    names = [f"s{i:06d}" for i in range(items)]
    lines = [
        'name = "bench_static"',
        "[[steps]]",
        'name = "root"',
        'handler = "bench.batch_root"',
    ]
    for i, name in enumerate(names):
        lines += [
            "[[steps]]",
            f'name = "{name}"',
            'handler = "bench.batch_item"',
            'depends_on = ["root"]',
            f"inputs = {{ item = {i} }}",
        ]
    lines += ["[[steps]]", 'name = "total"', 'handler = "bench.static_total"']
    lines.append("depends_on = [" + ", ".join(f'"{n}"' for n in names) + "]")
    return "\n".join(lines) + "\n"


# --- handlers (a private registry in the child) -------------------------------------------


def split(ctx: StepContext) -> Batch:
    return Batch(range(int(ctx.inputs["n"])))


def root(ctx: StepContext) -> None:
    return None


def item(ctx: StepContext) -> dict[str, Any]:
    return {"n": ctx.inputs["item"]}


def batch_total(ctx: StepContext) -> dict[str, Any]:
    count = total = 0
    for r in ctx.batch_results("item", page_size=PAGE_SIZE):
        count += 1
        total += r.result["n"] if r.result else 0
    return {"count": count, "sum": total}


def static_total(ctx: StepContext) -> dict[str, Any]:
    results = ctx.dependency_results
    return {"count": len(results), "sum": sum(r.get("n", 0) for r in results.values())}


def measured_total(ctx: StepContext) -> dict[str, Any]:
    """The convergence of the memory run: the same sum read three ways, each timed, then each
    under ``tracemalloc`` (peak of Python allocations while it reads; every thread counts,
    and nothing else runs in the worker by then)."""

    def paged() -> int:
        total = 0
        for r in ctx.batch_results("item", page_size=PAGE_SIZE):  # results not kept
            total += r.result["n"] if r.result else 0
        return total

    def naive() -> int:
        everything = list(ctx.batch_results("item", page_size=ITEMS_IN_RUN[0]))
        return sum(r.result["n"] for r in everything if r.result)

    next(iter(ctx.batch_results("item", page_size=1)))  # the statement compiled, the pool warm
    figures: dict[str, Any] = {}
    for name, read in (("paged", paged), ("naive", naive), ("paged_again", paged)):
        t0 = time.perf_counter()
        figures[f"{name}_sum"] = read()
        figures[f"{name}_s"] = time.perf_counter() - t0
    for name, read in (("paged", paged), ("naive", naive), ("paged_again", paged)):
        tracemalloc.start()
        base, _ = tracemalloc.get_traced_memory()
        read()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        figures[f"{name}_peak_bytes"] = peak - base
    MEASURED.update(figures)
    return {"sum": figures["paged_sum"]}


ITEMS_IN_RUN = [ITEMS]
MEASURED: dict[str, Any] = {}


def registry_for(variant: str) -> HandlerRegistry:
    registry = HandlerRegistry()
    registry.register("bench.batch_split", split)
    registry.register("bench.batch_root", root)
    registry.register("bench.batch_item", item)
    registry.register("bench.static_total", static_total)
    registry.register(
        "bench.batch_total", measured_total if variant == "convergence" else batch_total
    )
    return registry


class ThreadProfilers:
    """cProfile sees only the thread that enables it: one profiler per thread started after
    ``start()`` (the worker's actors and handler threads), merged by ``dump()``."""

    def __init__(self) -> None:
        self.profilers: list[cProfile.Profile] = []

    def start(self) -> None:
        def hook(*_: Any) -> None:
            sys.setprofile(None)
            profiler = cProfile.Profile()
            self.profilers.append(profiler)
            profiler.enable()

        threading.setprofile(hook)

    def stop(self) -> None:
        threading.setprofile(None)

    def dump(self, path: Path) -> None:
        stats: pstats.Stats | None = None
        for profiler in self.profilers:
            profiler.create_stats()
            if stats is None:
                stats = pstats.Stats(profiler)
            else:
                stats.add(profiler)
        if stats is not None:
            stats.dump_stats(path)


# --- the child: one run --------------------------------------------------------------------


def rss_kib(field: str = "VmRSS") -> int:
    """This process's resident set (or ``VmHWM``, its peak so far) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


class Sampler:
    """RSS every ``SAMPLE_S``, with how many outcomes were committed by then."""

    def __init__(self, committed: list[int], items: int) -> None:
        self.committed = committed
        self.items = items
        self.objects: list[tuple[int, int]] = []
        self.samples: list[tuple[float, int, int]] = []
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self._thread.start()

    def _run(self) -> None:
        marks = [self.items // 4, self.items * 3 // 4]
        while not self._stop.is_set():
            done = self.committed[0]
            self.samples.append((time.perf_counter() - self.t0, rss_kib(), done))
            if marks and done >= marks[0]:
                # Python objects the collector tracks: grows if something keeps every item.
                self.objects.append((done, len(gc.get_objects())))
                marks.pop(0)
            self._stop.wait(SAMPLE_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def child_main(variant: str, backend: str, items: int, profile: str | None) -> int:
    quiet_logging()
    ITEMS_IN_RUN[0] = items
    out: dict[str, Any] = {"variant": variant, "backend": backend, "items": items}
    with database(backend) as db:
        if db is None:
            print(json.dumps({**out, "skipped": "PostgreSQL not reachable"}))
            return 0
        text = (
            static_template_text(items)
            if variant == "static"
            else BATCH_TEMPLATE.format(items=items)
        )
        t0 = time.perf_counter()
        template = parse_template(text)
        t1 = time.perf_counter()
        with db.write() as conn:
            task = create_task(conn, template, {}, now=utcnow())
        out["parse_s"], out["write_s"] = t1 - t0, time.perf_counter() - t1
        committed = [0]
        batch_commit: dict[str, float] = {}
        sampler = Sampler(committed, items)

        def observe(report: CommitReport) -> None:
            committed[0] += len(report.applied)
            if not batch_commit and any(o.step.name == "split" for o in report.applied):
                batch_commit["at_s"] = time.perf_counter() - sampler.t0
                batch_commit["rss_kib"] = rss_kib()

        settings = bench_settings(db.url, concurrency=CONCURRENCY)
        profilers = ThreadProfilers() if profile == variant else None
        out["rss_before_start_kib"], out["hwm_before_start_kib"] = rss_kib(), rss_kib("VmHWM")
        sampler.start()
        if profilers is not None:
            profilers.start()
        run = run_until_drained(
            db, settings, registry_for(variant), expected=items + 2, observer=observe
        )
        if profilers is not None:
            profilers.stop()
        sampler.stop()
        out["rss_end_kib"], out["hwm_end_kib"] = rss_kib(), rss_kib("VmHWM")
        with db.read() as conn:
            rows = conn.execute(
                select(workflow_steps.c.name, workflow_steps.c.state, workflow_steps.c.results)
                .where(workflow_steps.c.task_uuid == task)
                .where(workflow_steps.c.name == "total")
            ).all()
    out.update(
        drain_s=run.drain_s,
        start_s=run.start_s,
        cpu_s=run.cpu_s,
        timed_out=run.timed_out,
        error=repr(run.serve_error) if run.serve_error else None,
        total=[(r.state, r.results) for r in rows],
        batch_commit=batch_commit,
        samples=sampler.samples,
        objects=sampler.objects,
        measured=MEASURED,
    )
    if profilers is not None:
        path = Path(f"/tmp/duplex-batches-{variant}-{backend}.prof")
        profilers.dump(path)
        out["profile"] = str(path)
    print(json.dumps(out, default=str))
    return 0


# --- the parent: alternate the variants, report --------------------------------------------


@dataclass
class Child:
    data: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.data.get("skipped") and not self.data.get("timed_out")

    def rate(self) -> float:
        return float(self.data["items"]) / float(self.data["drain_s"])


def run_child(variant: str, backend: str, items: int, profile: str | None) -> Child:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, backend]
    cmd += ["--items", str(items)]
    if profile:
        cmd += ["--profile", profile]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {variant}/{backend} failed:\n{done.stderr[-3000:]}")
    if done.stderr.strip():
        print("   (child stderr) " + done.stderr.strip().replace("\n", "\n   "))
    return Child(json.loads(done.stdout.strip().splitlines()[-1]))


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def check_total(child: Child, items: int) -> str:
    expected = items * (items - 1) // 2
    total = child.data["total"]
    if len(total) != 1 or total[0][0] != "complete":
        return f"!! total is {total}"
    results = total[0][1]
    if isinstance(results, str):
        results = json.loads(results)
    if results.get("sum") != expected:
        return f"!! total's sum {results.get('sum')} != {expected}"
    return ""


def describe_memory(child: Child) -> dict[str, Any]:
    samples = child.data["samples"]
    commit = child.data["batch_commit"]
    rss = [kib for _, kib, _ in samples]
    start = rss[0] if rss else 0
    # The growth while items complete: from the batch's commit (items exist) to the end.
    after = [(at, kib, n) for at, kib, n in samples if at >= commit.get("at_s", 0.0)]
    quarter = [kib for _, kib, n in after if n >= child.data["items"] // 4]
    return {
        "start": start,
        "after_commit": commit.get("rss_kib", 0),
        "commit_at_s": commit.get("at_s", 0.0),
        "max": max([*rss, commit.get("rss_kib", 0), child.data["rss_end_kib"]]),
        "hwm_grew": child.data["hwm_end_kib"] > child.data["hwm_before_start_kib"],
        "hwm": child.data["hwm_end_kib"],
        "end": child.data["rss_end_kib"],
        "from_quarter": (quarter[0], max(quarter)) if quarter else None,
        "objects": child.data["objects"],
    }


def bench_backend(backend: str, rounds: int, items: int, profile: str | None) -> list[Result]:
    print(
        f"== {backend}: {items} items at c={CONCURRENCY}, {rounds} rounds of batch then static,"
        " each run a fresh process and database"
    )
    runs: dict[str, list[Child]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for variant in VARIANTS:
            load = os.getloadavg()[0]
            child = run_child(variant, backend, items, profile if r == 0 else None)
            if child.data.get("skipped"):
                print(f"   {child.data['skipped']}: skipped")
                print()
                return []
            problem = check_total(child, items)
            if child.data.get("timed_out") or child.data.get("error"):
                problem += f" !! timed out or failed: {child.data.get('error')}"
            d = child.data
            commit = d["batch_commit"]
            if commit:
                extra = f"; the batch's commit at {fmt_s(commit['at_s'])}"
            else:
                extra = (
                    f"; submit (not timed): parse {fmt_s(d['parse_s'])}, "
                    f"write {fmt_s(d['write_s'])}"
                )
            print(
                f"   round {r + 1} {variant:<6} {child.rate():6.0f} items/s  drain "
                f"{fmt_s(d['drain_s'])}, CPU {d['cpu_s'] / items * 1000:.2f} ms/item{extra}"
                f"; load {load:.2f} {problem}"
            )
            if "profile" in d:
                print(f"      profile in {d['profile']}")
            runs[variant].append(child)
    rates = {v: [c.rate() for c in cs if c.ok] for v, cs in runs.items()}
    if not all(rates.values()):
        print("   !! a variant has no complete run")
        return []
    median = {v: statistics.median(rs) for v, rs in rates.items()}
    pair_ratios = [a.rate() / b.rate() for a, b in zip(runs["batch"], runs["static"], strict=True)]
    ratio = median["batch"] / median["static"]
    print(
        f"   median: batch {median['batch']:.0f}/s ({spread(rates['batch'])}), static "
        f"{median['static']:.0f}/s ({spread(rates['static'])}); batch/static {ratio:.2f}"
        f" (pairs {', '.join(f'{x:.2f}' for x in pair_ratios)})"
    )
    commits = [c.data["batch_commit"]["at_s"] for c in runs["batch"]]
    print(f"   the batch's commit ({items} items created) at {spread(commits, '{:.2f}')} s")
    # Two other readings of the same runs: the batch from its commit on (its items only), and
    # the static task with its submission (parse and write, the cost the batch pays in its
    # commit) counted in.
    after_commit = [
        items / (c.data["drain_s"] - c.data["batch_commit"]["at_s"]) for c in runs["batch"]
    ]
    with_submit = [
        items / (c.data["drain_s"] + c.data["parse_s"] + c.data["write_s"]) for c in runs["static"]
    ]
    print(
        f"   batch from its commit on {statistics.median(after_commit):.0f}/s"
        f" ({spread(after_commit)}); static with its submission"
        f" {statistics.median(with_submit):.0f}/s ({spread(with_submit)})"
    )
    results = [
        Result(backend, "batch items/s", f"{median['batch']:.0f} ({spread(rates['batch'])})"),
        Result(backend, "static items/s", f"{median['static']:.0f} ({spread(rates['static'])})"),
        Result(
            backend,
            "batch / static",
            f"{ratio:.2f} (pairs {spread(pair_ratios, '{:.2f}')})",
            ">= 0.80",
            ratio >= 0.80,
        ),
    ]
    results += [
        Result(
            backend,
            "batch items/s from its commit on",
            f"{statistics.median(after_commit):.0f} ({spread(after_commit)})",
        ),
        Result(
            backend,
            "static items/s, submission counted",
            f"{statistics.median(with_submit):.0f} ({spread(with_submit)})",
        ),
    ]
    for variant in VARIANTS:
        mems = [describe_memory(c) for c in runs[variant]]
        for m in mems:
            quarter = m["from_quarter"]
            grew = f"{(quarter[1] - quarter[0]) / 1024:+.1f} MiB" if quarter else "?"
            print(
                f"   RSS {variant:<6} start {fmt_kib(m['start'])}, after the batch commit "
                f"{fmt_kib(m['after_commit']) if m['after_commit'] else '-'}, max "
                f"{fmt_kib(m['max'])} (VmHWM {fmt_kib(m['hwm'])}), end {fmt_kib(m['end'])};"
                f" from 1/4 of the items done to the max {grew}; Python objects at "
                + ", ".join(f"{done} done {n}" for done, n in m["objects"])
            )
        samples = runs[variant][len(mems) // 2].data["samples"]
        step = max(1, len(samples) // 10)
        print(
            f"   RSS {variant:<6} timeline of round {len(mems) // 2 + 1} (s: MiB, items done): "
            + "; ".join(f"{at:.1f}: {kib / 1024:.1f}, {done}" for at, kib, done in samples[::step])
        )
        m = mems[len(mems) // 2]
        quarter = m["from_quarter"]
        results.append(
            Result(
                backend,
                f"RSS {variant}: start / commit / max / end",
                f"{fmt_kib(m['start'])} / "
                f"{fmt_kib(m['after_commit']) if m['after_commit'] else '-'} / "
                f"{fmt_kib(m['max'])} / {fmt_kib(m['end'])}",
            )
        )
        if quarter:
            grew = (quarter[1] - quarter[0]) / 1024
            results.append(
                Result(
                    backend,
                    f"RSS {variant}: growth after 1/4 done",
                    f"{grew:+.1f} MiB",
                    "flat (< 5 MiB)",
                    grew < 5,
                )
            )
    # The convergence's read, page by page against all at once.
    child = run_child("convergence", backend, items, None)
    m = child.data["measured"]
    print(
        f"   convergence read of {items} results: page_size={PAGE_SIZE} "
        f"{fmt_s(m['paged_s'])}, peak {m['paged_peak_bytes'] / 1024:.0f} KiB "
        f"(again: {fmt_s(m['paged_again_s'])}, {m['paged_again_peak_bytes'] / 1024:.0f} KiB);"
        f" all at once (page_size={items}) {fmt_s(m['naive_s'])}, peak "
        f"{m['naive_peak_bytes'] / 1024:.0f} KiB; sums {m['paged_sum']}, {m['naive_sum']}"
    )
    results.append(
        Result(
            backend,
            f"convergence peak, page_size={PAGE_SIZE} / all",
            f"{m['paged_peak_bytes'] / 1024:.0f} KiB / {m['naive_peak_bytes'] / 1024:.0f} KiB"
            f" ({m['naive_peak_bytes'] / max(m['paged_peak_bytes'], 1):.0f}x)",
        )
    )
    results.append(
        Result(
            backend,
            f"convergence read time, page_size={PAGE_SIZE} / all",
            f"{fmt_s(m['paged_s'])} / {fmt_s(m['naive_s'])}",
        )
    )
    print()
    return results


def print_profile(path: str, limit: int = 30) -> None:
    stats = pstats.Stats(path)
    stats.sort_stats("cumulative").print_stats(limit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Batches made at run time against static steps.")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of batch then static")
    parser.add_argument("--items", type=int, default=ITEMS)
    parser.add_argument("--only", choices=("sqlite", "postgres"), action="append")
    parser.add_argument(
        "--profile", choices=VARIANTS, help="cProfile the first run of this variant"
    )
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child[0], args.child[1], args.items, args.profile)
    quiet_logging()
    print_machine_info()
    results: list[Result] = []
    for backend in args.only or ("sqlite", "postgres"):
        results += bench_backend(backend, args.rounds, args.items, args.profile)
    print_load()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
