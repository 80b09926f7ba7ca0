"""The ``duplex`` commands about tasks and the workers serving them: ``submit``, ``status``
(``--watch`` in ``duplex.cli.watch``), the operator commands ``cancel``, ``retry``,
``resolve`` and ``complete``, ``signal``, and ``workers``.

Which workers are alive is the liveness rule's answer (``duplex.storage.workers``), the same
for ``status``, ``status --json`` and ``workers``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC
from typing import Any

from sqlalchemy import Connection

from duplex.cli import console
from duplex.cli.arguments import (
    aware_datetime,
    duration,
    json_object,
    json_value,
    positive_duration,
    positive_float,
    positive_int,
    priority,
)
from duplex.cli.common import open_database
from duplex.cli.context import parse_context
from duplex.cli.output import print_json
from duplex.cli.watch import watch
from duplex.client import Client
from duplex.clock import utcnow
from duplex.errors import InputError
from duplex.intake.start import start_time
from duplex.intake.wake import wake_local_workers
from duplex.settings import Settings
from duplex.storage.batch_view import batch_groups
from duplex.storage.cancels import cancel_step
from duplex.storage.concurrency import running_per_key
from duplex.storage.operations import (
    OperatorReport,
    cancel_task,
    complete_step,
    operator_identity,
    resolve_step,
    retry_step,
)
from duplex.storage.outbox import event_lag
from duplex.storage.pauses import list_pauses
from duplex.storage.queries import count_tasks, get_task, list_tasks, task_steps
from duplex.storage.rate_limits import list_limits
from duplex.storage.workers import alive_workers, judged_workers
from duplex.templates import load_template


def add_commands(sub: Any) -> None:
    """Add ``submit``, ``status``, ``cancel``, ``retry``, ``resolve``, ``complete``,
    ``signal`` and ``workers``."""
    submit = sub.add_parser("submit", help="create a task from a template; prints its UUID")
    submit.add_argument("template", help="template file, or a template name in templates.directory")
    submit.add_argument("--context", help="task context as a JSON object")
    submit.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="submitting the same KEY for this template again returns the existing task",
    )
    when = submit.add_mutually_exclusive_group()
    when.add_argument(
        "--at",
        type=aware_datetime,
        metavar="ISO8601",
        help="start no earlier than this time, with its offset (2026-12-24T08:00:00+01:00)",
    )
    when.add_argument(
        "--in",
        dest="delay",
        type=duration,
        metavar="DURATION",
        help="start no earlier than this from now (500ms, 2s, 15m, 1h, 1d)",
    )
    submit.add_argument(
        "--priority",
        type=priority,
        metavar="N",
        help="-100..100, higher claimed first (default: the template's priority)",
    )
    submit.add_argument(
        "--max-duration",
        metavar="DURATION",
        type=positive_duration,
        help="the task's deadline from now (500ms, 2s, 15m, 1h, 1d); overrides the template's",
    )
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="tasks, or one task's steps, with their states")
    status.add_argument("task_uuid", nargs="?", help="show this task's steps")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--items",
        action="store_true",
        help="with TASK_UUID: list each batch item too (by default a batch's items are one "
        "line of counts per state)",
    )
    status.add_argument("--limit", type=positive_int, default=50, help="tasks to list (default 50)")
    status.add_argument(
        "--watch",
        action="store_true",
        help="follow TASK_UUID live until it is complete, error or cancelled (then exit 0)",
    )
    status.add_argument(
        "--interval",
        type=positive_float,
        default=1.0,
        metavar="SECONDS",
        help="refresh interval of --watch (default 1)",
    )
    status.set_defaults(func=cmd_status)

    cancel = sub.add_parser(
        "cancel",
        help="cancel a task (or with --step one step): what has not started is cancelled now, "
        "running attempts are stopped by their workers within a sweep interval",
    )
    cancel.add_argument("task_uuid", metavar="TASK_UUID", nargs="?")
    cancel.add_argument(
        "--step", metavar="STEP_UUID", help="cancel this step only; the rest of its task goes on"
    )
    cancel.add_argument("--reason", metavar="TEXT", help="why (kept in the transition rows)")
    cancel.set_defaults(func=cmd_cancel)

    for name, what, help_text, func in (
        ("retry", "step_uuid", "give a step in error or cancelled one more attempt", cmd_retry),
        (
            "resolve",
            "step_uuid",
            "mark a step resolved_manually so that its dependents can run",
            cmd_resolve,
        ),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument(what, metavar=what.upper())
        command.add_argument("--reason", metavar="TEXT", help="why (kept in the transition rows)")
        command.set_defaults(func=func)

    complete = sub.add_parser(
        "complete", help="complete a step by hand with a result that its dependents read"
    )
    complete.add_argument("step_uuid", metavar="STEP_UUID")
    complete.add_argument(
        "--result", type=json_object, required=True, metavar="JSON", help="a JSON object"
    )
    complete.add_argument("--reason", metavar="TEXT", help="why (kept in the transition rows)")
    complete.set_defaults(func=cmd_complete)

    signal = sub.add_parser(
        "signal", help="send a signal to a task: the wait step waiting for NAME completes"
    )
    signal.add_argument("task_uuid", metavar="TASK_UUID")
    signal.add_argument("name", metavar="NAME", help="the signal's name (a wait step's `signal`)")
    signal.add_argument(
        "--payload",
        type=json_value,
        default=None,
        metavar="JSON",
        help='the wait step\'s result: an object, or any JSON value (kept as {"payload": ...})',
    )
    signal.add_argument(
        "--id",
        dest="signal_id",
        metavar="SIGNAL_ID",
        help="sending the same id again changes nothing (default: a new id)",
    )
    signal.set_defaults(func=cmd_signal)

    workers = sub.add_parser(
        "workers", help="every worker recorded in SQL: alive or presumed dead, slots, counts"
    )
    workers.add_argument("--json", action="store_true", help="machine-readable output")
    workers.add_argument(
        "--limit", type=positive_int, default=100, help="workers to list (default 100)"
    )
    workers.set_defaults(func=cmd_workers)


# --- duplex submit -------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    template = load_template(args.template, settings.templates.directory)
    context = parse_context(args.context)
    # --in counts from now, before the database is opened: the time printed is the one stored.
    start = start_time(args.at, args.delay, now=utcnow())
    with open_database(settings) as db, Client(db) as client:
        key = args.idempotency_key
        existing = client.find(template.name, key) if key is not None else None
        task_uuid = existing or client.submit(
            template,
            context,
            idempotency_key=key,
            run_at=start,
            priority=args.priority,
            max_duration=args.max_duration,
        )
    if existing:
        print(f"task for idempotency key {key!r} exists already; nothing written", file=sys.stderr)
    else:
        when = ""
        if start is not None:
            when = f", scheduled for {start.astimezone(UTC).isoformat(timespec='seconds')}"
        print(f"submitted {template.name} ({len(template.steps)} steps{when})", file=sys.stderr)
    print(task_uuid)
    return 0


# --- duplex status -------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    if args.items and not args.task_uuid:
        raise InputError("--items lists one task's batch items: give its TASK_UUID")
    if args.watch and not args.task_uuid:
        raise InputError("--watch follows one task: give its TASK_UUID")
    with open_database(settings) as db:
        if args.watch:
            return watch(db, args.task_uuid, interval_s=args.interval, as_json=args.json)
        with db.read() as conn:
            if args.task_uuid:
                _one_task(conn, args.task_uuid, as_json=args.json, items=args.items)
                return 0
            summaries = list_tasks(conn, limit=args.limit)
            # Counted only when the list may be cut short.
            total = count_tasks(conn) if len(summaries) == args.limit else len(summaries)
            now = utcnow()
            # Workers presumed dead by the liveness rule are not listed.
            alive = alive_workers(
                conn, claim_timeout_s=settings.event_system.claim_timeout_s, now=now
            )
            lag = event_lag(conn, now=now).as_json(now)
            paused = list_pauses(conn)
            keys, limits = running_per_key(conn, limit=10), list_limits(conn, now=now)
    if args.json:
        # In the order they started, as ``status --json`` has always listed them.
        rows = sorted((row for row, _ in alive), key=lambda r: (r["started_at"], r["worker_id"]))
        print_json(
            {
                "tasks": [t.as_json() for t in summaries],
                "total_tasks": total,
                "workers": [_worker_json(row) for row in rows],
                "events": lag,
                "paused": [p.as_json() for p in paused],
                "concurrency_keys": [k.as_json() for k in keys],
                "rate_limits": [limit.as_json() for limit in limits],
            }
        )
        return 0
    out = console.make_console()
    if summaries:
        out.print(console.tasks_table(summaries))
    else:
        print("no tasks")
    if total > len(summaries):
        print(
            f"the newest {len(summaries)} of {total} tasks; "
            f"`--limit {total}` lists them all, `status TASK_UUID` shows one"
        )
    print(console.lag_line(lag))
    for line in [*console.pause_lines(paused), *console.flow_lines(keys, limits)]:
        print(line)
    if alive:
        out.print()
        out.print(console.workers_table(alive, utcnow()))
    return 0


def _one_task(conn: Connection, task_uuid: str, *, as_json: bool, items: bool) -> None:
    """One task's steps; its batches' items counted per state in SQL, listed only with
    ``items`` (a batch may have 100k)."""
    task = get_task(conn, task_uuid)
    steps = task_steps(conn, task.task_uuid)
    groups = batch_groups(conn, task.task_uuid)
    listed = {g.batch_uuid: task_steps(conn, task.task_uuid, group=g) for g in groups if items}
    if as_json:
        batches = [
            {
                **g.as_json(),
                **({"item_steps": [s.as_json() for s in listed[g.batch_uuid]]} if items else {}),
            }
            for g in groups
        ]
        print_json({**task.as_json(), "steps": [s.as_json() for s in steps], "batches": batches})
        return
    out = console.make_console()
    out.print(console.task_header(task), highlight=False)
    out.print(console.steps_table(steps, groups, listed))


# --- duplex workers ------------------------------------------------------------------------


def cmd_workers(args: argparse.Namespace, settings: Settings) -> int:
    timeout_s = settings.event_system.claim_timeout_s
    with open_database(settings) as db, db.read() as conn:
        judged = judged_workers(conn, claim_timeout_s=timeout_s, now=utcnow(), limit=args.limit)
    now = utcnow()
    if args.json:
        print_json(
            [
                {
                    **_worker_json(row),
                    "alive": liveness.alive,
                    "state": liveness.state,
                    "why": liveness.why,
                    "heartbeat_age_s": round((now - row["heartbeat_at"]).total_seconds(), 3),
                }
                for row, liveness in judged
            ]
        )
        return 0
    if not judged:
        print("no workers recorded")
        return 0
    console.make_console().print(console.workers_table(judged, now))
    return 0


def _worker_json(row: dict[str, Any]) -> dict[str, Any]:
    """A ``workers`` row as JSON: its times in ISO 8601."""
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in row.items()}


# --- duplex cancel, retry, resolve ---------------------------------------------------------


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    if (args.task_uuid is None) == (args.step is None):
        raise InputError("give either TASK_UUID or --step STEP_UUID")
    if args.step is not None:
        print(_operate(settings, cancel_step, args.step, args.reason).summary)
    else:
        print(_operate(settings, cancel_task, args.task_uuid, args.reason).summary)
    return 0


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    print(_operate(settings, retry_step, args.step_uuid, args.reason).summary)
    return 0


def cmd_resolve(args: argparse.Namespace, settings: Settings) -> int:
    print(_operate(settings, resolve_step, args.step_uuid, args.reason).summary)
    return 0


def cmd_complete(args: argparse.Namespace, settings: Settings) -> int:
    def complete(conn: Any, target: str, **kw: Any) -> OperatorReport:
        return complete_step(conn, target, args.result, **kw)

    print(_operate(settings, complete, args.step_uuid, args.reason).summary)
    return 0


# --- duplex signal -------------------------------------------------------------------------


def cmd_signal(args: argparse.Namespace, settings: Settings) -> int:
    with open_database(settings) as db, Client(db) as client:
        report = client.signal(args.task_uuid, args.name, args.payload, signal_id=args.signal_id)
    print(report.summary)
    return 0


def _operate(
    settings: Settings,
    operation: Callable[..., OperatorReport],
    target: str,
    reason: str | None,
) -> OperatorReport:
    """Run one operator command in one write transaction (nothing written if it fails), then
    wake this host's workers if it made a step ready (SQLite)."""
    with open_database(settings) as db:
        with db.write() as conn:
            report = operation(
                conn, target, operator=operator_identity(), now=utcnow(), reason=reason
            )
        if report.made_ready:
            wake_local_workers(db, claim_timeout_s=settings.event_system.claim_timeout_s)
    return report
