"""What the CLI shows a person: rich tables and progress, built from the read-side queries.

Plain functions returning rich renderables; the CLI decides where they go. On a terminal the
tables fit its width (long cells fold, the UUID columns never do); piped, lines are never cut,
so scripts can grep them.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import IO, Any

from rich.console import Console, Group
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from duplex.storage.batch_view import BatchGroup
from duplex.storage.concurrency import KeyLoad
from duplex.storage.pauses import Pause
from duplex.storage.queries import StepSummary, TaskSummary
from duplex.storage.rate_limits import LimitRow
from duplex.storage.workers import Liveness

# Piped output: wide enough never to fold a line (tables take only the width they need).
_PIPE_WIDTH = 1000


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich's own answer is to exit 1; ``duplex.cli.common.run_command`` ends the process
        # as other Unix tools end when their reader goes away (``duplex.cli.output``).
        raise BrokenPipeError(errno.EPIPE, "the reader of standard output went away")


def make_console(file: IO[str] | None = None) -> Console:
    """A console on stdout: the terminal's width on a terminal, unbounded lines otherwise."""
    stream = file or sys.stdout
    if stream.isatty():
        return _Console(file=stream)
    return _Console(file=stream, width=_PIPE_WIDTH, color_system=None, highlight=False)


def duration(ms: int | None) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms} ms"
    return f"{ms / 1000:.1f} s"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def tasks_table(summaries: Sequence[TaskSummary]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("TASK", no_wrap=True)
    table.add_column("NAME", overflow="fold")
    table.add_column("STATE", no_wrap=True)
    table.add_column("EXECUTION STATUS", no_wrap=True)
    table.add_column("STEPS", justify="right", no_wrap=True)
    table.add_column("CREATED", no_wrap=True)
    for t in summaries:
        table.add_row(
            t.task_uuid,
            t.name,
            t.state,
            scheduled(t.execution_status, t.scheduled_for),
            f"{t.complete_steps}/{t.total_steps}",
            t.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    return table


def task_header(task: TaskSummary) -> str:
    extra = "".join(
        f", {n} {what}"
        for n, what in ((task.skipped_steps, "skipped"), (task.waiting_steps, "waiting"))
        if n
    )
    return (
        f"task {task.task_uuid}  {task.name} {task.version} ({task.namespace})\n"
        f"state {task.state}, execution status "
        f"{scheduled(task.execution_status, task.scheduled_for)}, "
        f"{task.complete_steps}/{task.total_steps} steps complete{extra}"
    )


def scheduled(status: str, start: datetime | None) -> str:
    """``scheduled for <time>`` for a task waiting for its start time, else the status."""
    if start is None:
        return status
    return f"scheduled for {start.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S')} UTC"


def steps_table(
    steps: Sequence[StepSummary],
    groups: Sequence[BatchGroup] = (),
    items: Mapping[str, Sequence[StepSummary]] | None = None,
) -> Table:
    """One row per step; a batch's items as one row after their batch step (the item step
    times the count, the counts per state in the STATE column), followed by each item only
    when ``items`` has them (``status --items``). A NOTE column (why a step was skipped,
    what it waits for) appears when a step has one."""
    noted = any(s.note for s in steps)
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("STEP", overflow="fold")
    table.add_column("STATE", no_wrap=True)
    table.add_column("ATTEMPTS", justify="right", no_wrap=True)
    table.add_column("DURATION", no_wrap=True)
    table.add_column("ERROR", overflow="fold")
    table.add_column("DEPENDS ON", overflow="fold")
    if noted:
        table.add_column("NOTE", overflow="fold")
    by_batch = {g.batch_uuid: g for g in groups}

    def add(s: StepSummary, indent: str = "") -> None:
        took = duration(s.duration_ms)
        if s.state == "in_progress" and s.duration_ms is not None:
            took += " (running)"
        row = [
            indent + s.name,
            s.state,
            f"{s.attempts}/{s.max_attempts}",
            took,
            s.error_type or "-",
            ", ".join(s.depends_on) or "-",
        ]
        table.add_row(*row, *([s.note or "-"] if noted else []))

    for s in steps:
        add(s)
        group = by_batch.get(s.step_uuid)
        if group is None:
            continue
        table.add_row(
            group.label, group.counts_text(), *["-"] * 3, s.name, *(["-"] if noted else [])
        )
        for item in (items or {}).get(group.batch_uuid, ()):
            add(item, "  ")
    return table


def task_progress(task: TaskSummary, steps: Sequence[StepSummary]) -> Progress:
    """A bar: steps complete of total, with how many run and how many failed."""
    running = sum(1 for s in steps if s.state == "in_progress")
    failed = sum(1 for s in steps if s.state == "error")
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} complete, {task.fields[detail]}"),
        auto_refresh=False,
    )
    progress.add_task(
        task.name,
        total=max(task.total_steps, 1),
        completed=task.complete_steps,
        detail=f"{running} running, {failed} failed",
    )
    return progress


def watch_view(task: TaskSummary, steps: Sequence[StepSummary], footer: str) -> Group:
    return Group(
        task_progress(task, steps),
        Text(task_header(task)),
        steps_table(steps),
        Text(footer, style="dim"),
    )


def workers_table(rows: Sequence[tuple[dict[str, Any], Liveness]], now: datetime) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("WORKER", no_wrap=True)
    table.add_column("STATE", overflow="fold")
    table.add_column("HEARTBEAT", justify="right", no_wrap=True)
    table.add_column("SLOTS", justify="right", no_wrap=True)
    table.add_column("COMMITTED", justify="right", no_wrap=True)
    table.add_column("REJECTED", justify="right", no_wrap=True)
    table.add_column("RECOVERED", justify="right", no_wrap=True)
    table.add_column("ABANDONED", justify="right", no_wrap=True)
    table.add_column("VERSION", no_wrap=True)
    for row, liveness in rows:
        stats = row.get("stats") or {}
        dispatcher = stats.get("dispatcher") or {}
        completion = stats.get("completion") or {}
        slots = stats.get("slots")
        running = dispatcher.get("running")
        in_use = "-" if running is None or not liveness.alive else str(running)
        state = liveness.state if liveness.alive else f"{liveness.state} ({liveness.why})"
        style = "green" if liveness.alive else ("dim" if liveness.state == "stopped" else "red")
        table.add_row(
            row["worker_id"],
            Text(state, style=style),
            age((now - row["heartbeat_at"]).total_seconds()) + " ago",
            f"{in_use}/{slots if slots is not None else '?'}",
            str(completion.get("committed", "-")),
            str(completion.get("rejected", "-")),
            str(completion.get("recovered", "-")),
            str(dispatcher.get("abandoned_threads", 0)),
            str(stats.get("version", "?")),
        )
    return table


def lag_line(lag: dict[str, Any]) -> str:
    """The relay's lag in one line, for ``duplex status``."""
    age = lag["oldest_unpublished_age_s"]
    oldest = f", oldest {age:.1f}s" if age is not None else ""
    return (
        f"events: {lag['unpublished']} unpublished{oldest}, "
        f"{lag['dead_lettered']} dead-lettered, {lag['published_per_s']:g} published/s "
        "(last minute)"
    )


def pause_lines(paused: Sequence[Pause]) -> list[str]:
    """One line per pause in force, for ``duplex status``."""
    return [
        f"paused: {p.label} since {p.paused_at.isoformat(timespec='seconds')} by {p.paused_by}"
        + (f" ({p.reason})" if p.reason else "")
        for p in paused
    ]


def flow_lines(keys: Sequence[KeyLoad], limits: Sequence[LimitRow]) -> list[str]:
    """The busiest concurrency keys and every rate limit, for ``duplex status``."""
    return [
        *(
            f"concurrency key {k.key}: {k.running} running, {k.held} held (limit {k.limit})"
            for k in keys
        ),
        *(
            f"rate limit {r.name}: {r.rate.text()}, burst {r.rate.burst}, "
            f"{r.tokens:.1f} token(s) now"
            for r in limits
        ),
    ]
