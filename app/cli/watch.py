"""``duplex status TASK_UUID --watch``: follow one task until it is finished."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

from rich.live import Live

from duplex.cli import console
from duplex.cli.common import EXIT_INTERRUPTED, stop_signals_received
from duplex.cli.output import check_reader
from duplex.clock import utcnow
from duplex.states import TASK_FINISHED
from duplex.storage.db import Database
from duplex.storage.queries import get_task, task_steps


def watch(db: Database, task_uuid: str, *, interval_s: float, as_json: bool) -> int:
    """Show the task until it is finished (exit 0); Ctrl-C stops watching (exit 130).

    On a terminal: a live view, redrawn in place every interval, with a progress bar (steps
    complete of total, running, failed) above the step table. Piped: a snapshot whenever a
    state changes (with ``--json``: one JSON object per line), so the output is a readable
    log of the run.
    """
    interactive = sys.stdout.isatty() and not as_json
    out = console.make_console()
    live = Live(console=out, auto_refresh=False, transient=False) if interactive else None
    last: tuple[Any, ...] | None = None
    # Ctrl-C is recorded, never raised: it never interrupts a query.
    with stop_signals_received() as stop, live or contextlib.nullcontext():
        while True:
            with db.read() as conn:
                task = get_task(conn, task_uuid)
                steps = task_steps(conn, task_uuid)
            key = (
                task.state,
                task.execution_status,
                tuple((s.state, s.attempts, s.error_type) for s in steps),
            )
            if live is not None:
                stamp = utcnow().strftime("%H:%M:%S UTC")
                footer = f"as of {stamp}; refresh every {interval_s:g}s; Ctrl-C to stop"
                live.update(console.watch_view(task, steps, footer), refresh=True)
            elif key != last:
                if as_json:
                    print(json.dumps({**task.as_json(), "steps": [s.as_json() for s in steps]}))
                else:
                    if last is not None:
                        print()
                    print(console.task_header(task))
                    out.print(console.steps_table(steps))
                sys.stdout.flush()
            last = key
            if task.state in TASK_FINISHED:
                return 0
            if live is None:
                check_reader()  # piped: stop once nobody reads, not at the next change
            if stop.wait(interval_s):
                print(f"duplex: stopped watching (task is {task.state})", file=sys.stderr)
                return EXIT_INTERRUPTED
