"""Logging: loguru for Duplex, with stdlib logging (pykka, SQLAlchemy, Alembic) routed into it.

Routing pykka's logger matters: an actor that crashes reports it through stdlib logging, and
that report must never vanish.

Every line about a step carries ``task_uuid``, ``step_uuid``, ``step_name``, ``attempt`` and
``worker_id`` (``step_log``; a handler's ``ctx.logger`` is bound the same way). The fields are
bound to the logger object, never kept in shared or thread state, so lines of steps running
side by side cannot swap them. With ``logging.serialize = true`` each line is one JSON object
with those fields as top-level keys, for a log shipper to index.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC
from typing import TYPE_CHECKING, Any

from loguru import logger

from app.settings import LoggingSettings

if TYPE_CHECKING:
    from loguru import Logger, Record

    from app.messages import ClaimedStep

STEP_FIELDS = ("task_uuid", "step_uuid", "step_name", "attempt", "worker_id")
_TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{name}</cyan> {message}"
)


def step_fields(step: ClaimedStep) -> dict[str, Any]:
    """The fields every log line about ``step``'s attempt carries."""
    return {
        "task_uuid": step.task_uuid,
        "step_uuid": step.step_uuid,
        "step_name": step.name,
        "attempt": step.attempt,
        "worker_id": step.claimed_by,
    }


def step_log(step: ClaimedStep) -> Logger:
    """Return a logger whose lines carry ``step``'s fields."""
    return logger.bind(**step_fields(step))


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


def _text_format(record: Record) -> str:
    # Step fields at the end of the line, so that the start stays greppable by time and level.
    extra = record["extra"]
    if "step_uuid" in extra:
        tail = " ".join(f"{key}={{extra[{key}]}}" for key in STEP_FIELDS if key in extra)
        return f"{_TEXT_FORMAT} <dim>[{tail}]</dim>\n{{exception}}"
    return _TEXT_FORMAT + "\n{exception}"


def json_line(record: Record) -> str:
    """Return ``record`` as one JSON object: time, level, logger, message, then the extras."""
    data: dict[str, Any] = {
        "time": record["time"].astimezone(UTC).isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "logger": record["name"],
        "message": record["message"],
        "function": record["function"],
        "line": record["line"],
        "thread": record["thread"].name,
    }
    for key, value in record["extra"].items():
        if not key.startswith("_"):
            data.setdefault(key, value)
    exception = record["exception"]
    if exception is not None and exception.type is not None:
        data["exception"] = "".join(
            traceback.format_exception(exception.type, exception.value, exception.traceback)
        ).rstrip()
    return json.dumps(data, default=str, ensure_ascii=False)


def _json_format(record: Record) -> str:
    # loguru formats the returned template with the record: the line goes in through an
    # extra, so braces inside the JSON are never read as placeholders.
    record["extra"]["_json"] = json_line(record)
    return "{extra[_json]}\n"


def configure_logging(settings: LoggingSettings) -> None:
    """Log to stderr at ``settings.level``; route stdlib logging through loguru."""
    logger.remove()
    logger.add(
        sys.stderr,
        level=settings.level,
        format=_json_format if settings.serialize else _text_format,
        colorize=False if settings.serialize else None,
        backtrace=False,
        diagnose=False,
    )
    logging.basicConfig(handlers=[InterceptHandler()], level=logging.INFO, force=True)
    logging.getLogger("pykka").setLevel(logging.INFO)
    logging.getLogger("pykka").disabled = False
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # SQLAlchemy logs every statement at INFO; keep its warnings and errors only.
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
