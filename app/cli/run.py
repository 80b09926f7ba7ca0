"""``duplex run``: the long-lived worker, from its stop signals to its last commit.

The stop signals are ``duplex.worker.startup``'s, installed by ``duplex.__main__`` before the
CLI's imports. Start-up (the handler modules' imports, the migration, the registration) can
be stopped at any point; once serving, the first signal drains and a second exits at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from loguru import logger

from duplex.cli.arguments import positive_int
from duplex.cli.common import open_database
from duplex.cli.progress import RunProgress
from duplex.handlers import import_handler_modules
from duplex.settings import Settings
from duplex.storage.db import WORKER_PING_AFTER_IDLE_S, Database
from duplex.worker.startup import StartupStopped, StopSignals, retry_transient, stop_signals


def add_commands(sub: Any) -> None:
    """Add ``run`` to the ``duplex`` parser."""
    run = sub.add_parser("run", help="run the long-lived worker")
    run.add_argument(
        "--until-idle", action="store_true", help="exit once no work is left that could run"
    )
    run.add_argument(
        "--concurrency", type=positive_int, help="handler slots (worker.max_concurrent_handlers)"
    )
    run.add_argument(
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NS",
        help="namespace to serve (repeatable)",
    )
    run.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    # Installed by duplex.__main__ before the CLI's imports; here when called some other way.
    signals = stop_signals()
    settings = _with_overrides(settings, args)
    try:
        with signals.interruptible():
            # Imports that take a while (the user's may block), then the worker itself.
            import_handler_modules(settings.worker.handler_modules)
            from duplex.worker.wiring import Worker
    except StartupStopped:
        _stopped_during_startup(signals)
        return 0
    # The worker migrates the schema itself: no check on opening.
    with open_database(
        settings, check_schema=False, ping_after_idle_s=WORKER_PING_AFTER_IDLE_S
    ) as db:
        worker = Worker(settings, db)
        progress: RunProgress | None = None
        try:
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
            _stopped_during_startup(signals)
        finally:
            try:
                # Raises WorkerCrashedError or UncommittedResultsError: one line, a non-zero exit.
                worker.stop()
            finally:
                # The summary reads what is left after the stop's last commit.
                if progress is not None:
                    progress.close()
    return 0


def _with_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    """The settings with what ``--concurrency`` and ``--namespace`` override."""
    worker_cfg: dict[str, Any] = {}
    if args.concurrency:
        worker_cfg["max_concurrent_handlers"] = args.concurrency
    if args.namespaces:
        worker_cfg["namespaces"] = tuple(args.namespaces)
    if not worker_cfg:
        return settings
    return settings.model_copy(update={"worker": settings.worker.model_copy(update=worker_cfg)})


def _stopped_during_startup(signals: StopSignals) -> None:
    logger.info("{} received during start-up: stopped before serving", signals.name)


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
