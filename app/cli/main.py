"""The ``duplex`` command line: run, submit, status, migrate, the operator commands
cancel, retry and resolve, and the dashboard.

Any ``DuplexError`` becomes one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from loguru import logger
from rich.live import Live
from sqlalchemy import Connection

from duplex.cli import console
from duplex.cli.context import parse_context
from duplex.cli.dashboard import add_commands as add_dashboard_commands
from duplex.cli.events import add_commands as add_event_commands
from duplex.cli.events import lag_line
from duplex.cli.output import check_reader, exit_for_closed_output, reader_gone
from duplex.cli.progress import RunProgress
from duplex.client import Client
from duplex.clock import utcnow
from duplex.errors import DuplexError, InputError
from duplex.handlers import import_handler_modules
from duplex.observability.logs import configure_logging
from duplex.settings import Settings, load_settings
from duplex.states import TASK_FINISHED
from duplex.storage.db import Database
from duplex.storage.operations import (
    OperatorReport,
    cancel_task,
    operator_identity,
    resolve_step,
    retry_step,
)
from duplex.storage.outbox import event_lag
from duplex.storage.queries import (
    active_workers,
    count_tasks,
    get_task,
    list_tasks,
    task_steps,
)
from duplex.storage.schema import ensure_schema_ready
from duplex.storage.workers import Liveness, judged_workers
from duplex.templates import load_template
from duplex.worker.startup import StartupStopped, StopSignals, retry_transient, stop_signals

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

    from duplex.worker.wiring import Worker

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"duplex: error: {message} (see `duplex --help`)\n")

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        # argparse swallows a failed write, which would hide a closed pipe on stdout
        # (`duplex --help | head -1`) from main(); stderr keeps argparse's way.
        if message and file is sys.stdout:
            file.write(message)
        else:
            super()._print_message(message, file)


_SETTINGS_HELP = "settings file (default: $DUPLEX_SETTINGS or ./settings.toml)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="duplex", description="Duplex: a bounded-parallel step worker.")
    parser.add_argument("--settings", metavar="FILE", help=_SETTINGS_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the long-lived worker")
    run.add_argument(
        "--until-idle", action="store_true", help="exit once no work is left that could run"
    )
    run.add_argument(
        "--concurrency", type=_positive_int, help="handler slots (worker.max_concurrent_handlers)"
    )
    run.add_argument(
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NS",
        help="namespace to serve (repeatable)",
    )
    run.set_defaults(func=cmd_run)

    submit = sub.add_parser("submit", help="create a task from a template; prints its UUID")
    submit.add_argument("template", help="template file, or a template name in templates.directory")
    submit.add_argument("--context", help="task context as a JSON object")
    submit.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="submitting the same KEY for this template again returns the existing task",
    )
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="tasks, or one task's steps, with their states")
    status.add_argument("task_uuid", nargs="?", help="show this task's steps")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--limit", type=_positive_int, default=50, help="tasks to list (default 50)"
    )
    status.add_argument(
        "--watch",
        action="store_true",
        help="follow TASK_UUID live until it is complete, error or cancelled (then exit 0)",
    )
    status.add_argument(
        "--interval",
        type=_positive_float,
        default=1.0,
        metavar="SECONDS",
        help="refresh interval of --watch (default 1)",
    )
    status.set_defaults(func=cmd_status)

    for name, what, help_text, func in (
        (
            "cancel",
            "task_uuid",
            "cancel a task: steps not yet running are cancelled, running ones finish",
            cmd_cancel,
        ),
        ("retry", "step_uuid", "give a step in error one more attempt", cmd_retry),
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

    workers = sub.add_parser(
        "workers", help="every worker recorded in SQL: alive or presumed dead, slots, counts"
    )
    workers.add_argument("--json", action="store_true", help="machine-readable output")
    workers.add_argument(
        "--limit", type=_positive_int, default=100, help="workers to list (default 100)"
    )
    workers.set_defaults(func=cmd_workers)
    add_event_commands(sub)
    add_dashboard_commands(sub)

    migrate = sub.add_parser("migrate", help="bring the database schema to head")
    migrate.set_defaults(func=cmd_migrate)
    for command in sub.choices.values():
        # Also after the command (`duplex migrate --settings pg.toml`). SUPPRESS: when it is
        # not given there, the value given before the command stands.
        command.add_argument(
            "--settings", metavar="FILE", default=argparse.SUPPRESS, help=_SETTINGS_HELP
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``duplex`` console script.

    Output to a pipe whose reader went away (``duplex events | head -1``) ends the process as
    it ends ``cat`` or ``grep``: killed by SIGPIPE, quietly (``duplex.cli.output``).
    """
    try:
        try:
            return _main(argv)
        finally:
            # Whatever is still buffered is written here, where a closed pipe is handled,
            # rather than by the interpreter on its way out ("Exception ignored ...").
            sys.stdout.flush()
    except BrokenPipeError as exc:
        if reader_gone():
            exit_for_closed_output()
        return _internal_error(exc)


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        func: Callable[[argparse.Namespace, Settings], int] = args.func
        settings = load_settings(args.settings)
        configure_logging(settings.logging)
        return func(args, settings)
    except DuplexError as exc:
        _say(f"duplex: error: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say("duplex: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise  # main() tells a closed stdout from a broken socket
    except Exception as exc:
        return _internal_error(exc)


def _internal_error(exc: BaseException) -> int:
    # A bug in Duplex: still no traceback on the terminal.
    logger.opt(exception=exc).debug("unexpected error")
    _say(f"duplex: internal error: {type(exc).__name__}: {exc}")
    return EXIT_ERROR


def _say(line: str) -> None:
    """One line on stderr; a stderr nobody reads any more is not a reason for a traceback."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    # Alembic is imported by the two commands that migrate, not by every command.
    from duplex.storage.migrate import upgrade_to_head

    db = Database(settings.database)
    try:
        before, after = upgrade_to_head(db)
    finally:
        db.dispose()
    print(migration_summary(before, after))
    return 0


def migration_summary(before: str | None, after: str | None) -> str:
    """What ``duplex migrate`` did, in one line."""
    if before == after:
        return f"the database schema is already at {after} (head); nothing to do"
    if before is None:
        return f"created the database schema at {after} (head)"
    return f"upgraded the database schema from {before} to {after} (head)"


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    template = load_template(args.template, settings.templates.directory)
    context = parse_context(args.context)
    db = Database(settings.database)
    try:
        ensure_schema_ready(db)
        with Client(db) as client:
            key = args.idempotency_key
            existing = client.find(template.name, key) if key is not None else None
            task_uuid = existing or client.submit(template, context, idempotency_key=key)
    finally:
        db.dispose()
    if existing:
        print(f"task for idempotency key {key!r} exists already; nothing written", file=sys.stderr)
    else:
        print(f"submitted {template.name} ({len(template.steps)} steps)", file=sys.stderr)
    print(task_uuid)
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    if args.watch and not args.task_uuid:
        raise InputError("--watch follows one task: give its TASK_UUID")
    db = Database(settings.database)
    try:
        ensure_schema_ready(db)
        if args.watch:
            return _watch(db, args.task_uuid, interval_s=args.interval, as_json=args.json)
        with db.read() as conn:
            if args.task_uuid:
                task = get_task(conn, args.task_uuid)
                steps = task_steps(conn, args.task_uuid)
                if args.json:
                    _print_json({**task.as_json(), "steps": [s.as_json() for s in steps]})
                else:
                    out = console.make_console()
                    out.print(console.task_header(task), highlight=False)
                    out.print(console.steps_table(steps))
                return 0
            summaries = list_tasks(conn, limit=args.limit)
            # Counted only when the list may be cut short.
            total = count_tasks(conn) if len(summaries) == args.limit else len(summaries)
            # Workers presumed dead by the liveness rule are not listed.
            cutoff = utcnow() - timedelta(seconds=settings.event_system.claim_timeout_s)
            live = active_workers(conn, heartbeat_since=cutoff)
            judged = [(row, lv) for row, lv in _judged_workers(conn, settings) if lv.alive]
            now = utcnow()
            lag = event_lag(conn, now=now).as_json(now)
    finally:
        db.dispose()
    if args.json:
        _print_json(
            {
                "tasks": [t.as_json() for t in summaries],
                "total_tasks": total,
                "workers": live,
                "events": lag,
            }
        )
    else:
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
        print(lag_line(lag))
        if judged:
            out.print()
            out.print(console.workers_table(judged, utcnow()))
    return 0


def _judged_workers(
    conn: Connection, settings: Settings, *, limit: int = 100
) -> list[tuple[dict[str, Any], Liveness]]:
    """The workers recorded in SQL, each with what the liveness rule says about it."""
    return judged_workers(
        conn, claim_timeout_s=settings.event_system.claim_timeout_s, now=utcnow(), limit=limit
    )


def cmd_workers(args: argparse.Namespace, settings: Settings) -> int:
    db = Database(settings.database)
    try:
        ensure_schema_ready(db)
        with db.read() as conn:
            judged = _judged_workers(conn, settings, limit=args.limit)
    finally:
        db.dispose()
    now = utcnow()
    if args.json:
        _print_json(
            [
                {
                    **{k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in row.items()},
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


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    print(_operate(settings, cancel_task, args.task_uuid, args.reason).summary)
    return 0


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    print(_operate(settings, retry_step, args.step_uuid, args.reason).summary)
    return 0


def cmd_resolve(args: argparse.Namespace, settings: Settings) -> int:
    print(_operate(settings, resolve_step, args.step_uuid, args.reason).summary)
    return 0


def _operate(
    settings: Settings,
    operation: Callable[..., OperatorReport],
    target: str,
    reason: str | None,
) -> OperatorReport:
    """Run one operator command in one write transaction (nothing written if it fails)."""
    db = Database(settings.database)
    try:
        ensure_schema_ready(db)
        with db.write() as conn:
            return operation(
                conn, target, operator=operator_identity(), now=utcnow(), reason=reason
            )
    finally:
        db.dispose()


def _watch(db: Database, task_uuid: str, *, interval_s: float, as_json: bool) -> int:
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
    with _interrupt_flag() as interrupted, live or contextlib.nullcontext():
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
            if interrupted.wait(interval_s):
                print(f"duplex: stopped watching (task is {task.state})", file=sys.stderr)
                return EXIT_INTERRUPTED


@contextmanager
def _interrupt_flag() -> Iterator[threading.Event]:
    """Turn SIGINT into an Event for the duration, so Ctrl-C never interrupts a query."""
    flag = threading.Event()
    try:
        previous = signal.signal(signal.SIGINT, lambda _signum, _frame: flag.set())
    except ValueError:  # not the main thread (embedded use): Ctrl-C stays KeyboardInterrupt
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    # Installed by duplex.__main__ before the CLI's imports; here when called some other way.
    signals = stop_signals()
    worker_cfg: dict[str, Any] = {}
    if args.concurrency:
        worker_cfg["max_concurrent_handlers"] = args.concurrency
    if args.namespaces:
        worker_cfg["namespaces"] = tuple(args.namespaces)
    if worker_cfg:
        settings = settings.model_copy(
            update={"worker": settings.worker.model_copy(update=worker_cfg)}
        )
    db: Database | None = None
    worker: Worker | None = None
    progress: RunProgress | None = None
    try:
        with signals.interruptible():
            # Imports that take a while (the user's may block), then the worker itself.
            import_handler_modules(settings.worker.handler_modules)
            from duplex.worker.wiring import Worker

        db = Database(settings.database)
        worker = Worker(settings, db)
        signals.on_stop(worker.request_stop)
        # The health port opens first: a probe sees the worker starting while it migrates.
        worker.serve_http()
        with signals.interruptible():
            _prepare_database(db, worker.register, settings, signals)
        worker.start()
        signals.raise_if_received()  # one that came while the actors started
        progress = RunProgress(worker.metrics, worker.open_work) if args.until_idle else None
        worker.serve(until_idle=args.until_idle, on_tick=progress.tick if progress else None)
        if signals.received:
            logger.info("{} received: draining (send again to exit at once)", signals.name)
    except StartupStopped:
        logger.info("{} received during start-up: stopped before serving", signals.name)
    finally:
        try:
            # Raises WorkerCrashedError or UncommittedResultsError: one line, a non-zero exit.
            if worker is not None:
                worker.stop()
        finally:
            # The summary reads what is left after the stop's last commit.
            if progress is not None:
                progress.close()
            if db is not None:
                db.dispose()
    return 0


def _prepare_database(
    db: Database, register: Callable[[], None], settings: Settings, signals: StopSignals
) -> None:
    """Migrate under the migration lock, then register the worker; retry what can pass."""
    from duplex.storage.migrate import (
        upgrade_to_head,  # Alembic: only for the commands that migrate
    )

    def log(line: str) -> None:
        with signals.deferred():
            logger.warning(line)

    def retry(action: Callable[[], object], what: str) -> None:
        retry_transient(
            action,
            what=what,
            timeout_s=settings.worker.startup_timeout_s,
            stopped=lambda: bool(signals.received),
            log=log,
        )

    retry(lambda: upgrade_to_head(db), "bring the database schema to head")
    retry(register, "register the worker")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))
