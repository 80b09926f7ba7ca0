"""``duplex dashboard``: serve the web dashboard until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

from loguru import logger

from duplex.dashboard import Dashboard
from duplex.dashboard.security import check_binding
from duplex.errors import SchemaNotReadyError, StorageError
from duplex.observability.http import HttpServer
from duplex.settings import Settings
from duplex.storage.db import Database
from duplex.storage.schema import ensure_schema_ready


def add_commands(sub: Any) -> None:
    dashboard = sub.add_parser(
        "dashboard", help="serve the web dashboard (tasks, DAGs, attempts, workers)"
    )
    dashboard.add_argument("--host", help="address to bind (dashboard.host, default 127.0.0.1)")
    dashboard.add_argument(
        "--port", type=_port, help="port (dashboard.port, default 8420; 0 picks a free one)"
    )
    dashboard.set_defaults(func=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    cfg = settings.dashboard
    host = args.host or cfg.host
    port = cfg.port if args.port is None else args.port
    check_binding(host, cfg.token.get_secret_value() if cfg.token is not None else None)
    db = Database(settings.database)
    try:
        try:
            ensure_schema_ready(db)
        except SchemaNotReadyError:
            raise
        except StorageError as exc:
            # Serve anyway: every page says the database is unavailable until it is back.
            logger.warning("dashboard: the database is unavailable for now ({})", exc)
        server = HttpServer(
            host,
            port,
            Dashboard(settings, db),
            threads=8,
            settings_name="dashboard.host/port",
            serves="dashboard",
        )
        server.start()
        try:
            _wait_for_stop_signal()
        finally:
            server.stop()
    finally:
        db.dispose()
    return 0


def _wait_for_stop_signal() -> None:
    stop = threading.Event()

    def handle(_signum: int, _frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(3600):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535: {value}")
    return value
