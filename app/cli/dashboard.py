"""``duplex dashboard``: serve the web dashboard until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
from typing import Any

from loguru import logger

from duplex.cli import arguments
from duplex.cli.common import open_database, stop_signals_received
from duplex.dashboard import Dashboard
from duplex.dashboard.security import check_binding
from duplex.errors import StorageError
from duplex.observability.http import HttpServer
from duplex.settings import Settings


def add_commands(sub: Any) -> None:
    dashboard = sub.add_parser(
        "dashboard", help="serve the web dashboard (tasks, DAGs, attempts, workers)"
    )
    dashboard.add_argument("--host", help="address to bind (dashboard.host, default 127.0.0.1)")
    dashboard.add_argument(
        "--port",
        type=arguments.port,
        help="port (dashboard.port, default 8420; 0 picks a free one)",
    )
    dashboard.set_defaults(func=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    cfg = settings.dashboard
    host = args.host or cfg.host
    port = cfg.port if args.port is None else args.port
    check_binding(host, cfg.token.get_secret_value() if cfg.token is not None else None)
    with open_database(settings, unavailable=_serve_anyway) as db:
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
            with stop_signals_received() as stop:
                while not stop.wait(3600):
                    pass
        finally:
            server.stop()
    return 0


def _serve_anyway(exc: StorageError) -> None:
    # Every page says the database is unavailable until it is back.
    logger.warning("dashboard: the database is unavailable for now ({})", exc)
