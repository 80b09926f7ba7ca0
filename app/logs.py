"""Logging: loguru for Duplex, with stdlib logging (pykka, SQLAlchemy, Alembic) routed into it.

Routing pykka's logger matters: an actor that crashes reports it through stdlib logging, and
that report must never vanish.
"""

from __future__ import annotations

import logging
import sys

from loguru import logger

from app.settings import LoggingSettings


class InterceptHandler(logging.Handler):
    """Send stdlib log records to loguru, keeping level and caller."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        # Show the stdlib logger's name (pykka, alembic, ...) rather than this module's.
        named = logger.patch(lambda r: r.update(name=record.name))  # type: ignore[call-arg]
        named.opt(exception=record.exc_info).log(level, record.getMessage())


def configure_logging(settings: LoggingSettings) -> None:
    """Log to stderr at ``settings.level``; route stdlib logging through loguru."""
    logger.remove()
    logger.add(
        sys.stderr,
        level=settings.level,
        serialize=settings.serialize,
        format=(
            "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
            "<cyan>{name}</cyan> {message}"
        ),
        backtrace=False,
        diagnose=False,
    )
    logging.basicConfig(handlers=[InterceptHandler()], level=logging.INFO, force=True)
    logging.getLogger("pykka").setLevel(logging.INFO)
    logging.getLogger("pykka").disabled = False
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # SQLAlchemy logs every statement at INFO; keep its warnings and errors only.
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
