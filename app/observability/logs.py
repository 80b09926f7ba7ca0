r"""Logging: loguru for Duplex, with stdlib logging (pykka, SQLAlchemy, Alembic) routed into it.

Routing pykka's logger matters: an actor that crashes reports it through stdlib logging, and
that report must never vanish.

Every line about a step carries ``task_uuid``, ``step_uuid``, ``step_name``, ``attempt`` and
``worker_id`` (``step_log``; a handler's ``ctx.logger`` is bound the same way). The fields are
bound to the logger object, never kept in shared or thread state, so lines of steps running
side by side cannot swap them. With ``logging.serialize = true`` each line is one JSON object
with those fields as top-level keys, for a log shipper to index.

**One record, one line**, in both formats, whatever the message holds: a driver's error text
(``server closed the connection unexpectedly\n\tThis probably means ...``), a handler's
multi-line message. Plain text writes line breaks, tabs and other control characters as
escapes (``\n``, ``\t``, ``\x1b``); JSON escapes them anyway. A record with an exception
ends with ``| ValueError: boom (at myapp/handlers.py:12 in f)``: in JSON the full traceback is the
``exception`` key of the same line; in plain text it follows on its own lines only when
``logging.level`` is DEBUG or TRACE, where someone is reading a terminal, not shipping logs.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from datetime import UTC
from typing import TYPE_CHECKING, Any, TextIO

from loguru import logger

from duplex.settings import LoggingSettings

if TYPE_CHECKING:
    from loguru import Logger, Record, RecordException

    from duplex.messages import ClaimedStep

STEP_FIELDS = ("task_uuid", "step_uuid", "step_name", "attempt", "worker_id")
_TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{name}</cyan> {extra[_line]}"
)
# Levels at which plain text shows a record's full traceback after its line.
_TRACEBACK_LEVELS = ("TRACE", "DEBUG")

# Characters a log line must not carry raw: line breaks (and what splitlines() counts as
# one) would cut a record into several, which a shipper reads as several records; other
# control characters, such as a terminal escape in a message, could repaint a terminal.
_ESCAPES: dict[int, str] = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, 0x85)}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
# JSON escapes control characters itself, but not these three, which splitlines() breaks at.
_JSON_ESCAPES = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def one_line(text: str) -> str:
    """``text`` with its line breaks, tabs and other control characters as escapes."""
    return text.translate(_ESCAPES)


def exception_summary(exception: RecordException) -> str:
    """``Type: message (at file:line in function)``, where it was raised; one line."""
    name = exception.type.__name__ if exception.type is not None else "Exception"
    text = str(exception.value) if exception.value is not None else ""
    summary = f"{name}: {text}" if text else name  # as a traceback's last line says it
    frames = traceback.extract_tb(exception.traceback) if exception.traceback else []
    if frames:
        last = frames[-1]
        summary += f" (at {last.filename}:{last.lineno} in {last.name})"
    return one_line(summary)


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
        # Show the stdlib logger's name (pykka, alembic, ...) and caller, not this method.
        named = logger.patch(
            lambda r: r.update(  # type: ignore[call-arg]
                name=record.name, function=record.funcName, line=record.lineno
            )
        )
        named.opt(exception=record.exc_info).log(level, record.getMessage())


def text_format(*, tracebacks: bool) -> Callable[[Record], str]:
    """The plain-text format: one line per record (``tracebacks``: then the traceback)."""

    def format_record(record: Record) -> str:
        # What the record holds goes in through extras, already escaped: loguru never reads
        # a placeholder's value as markup or as another placeholder.
        extra = record["extra"]
        line = one_line(record["message"])
        exception = record["exception"]
        failed = exception is not None and exception.type is not None
        if failed:
            assert exception is not None
            line += " | " + exception_summary(exception)
        extra["_line"] = line
        template = _TEXT_FORMAT
        if "step_uuid" in extra:
            # Step fields at the end, so that the start stays greppable by time and level.
            fields = " ".join(f"{key}={extra[key]}" for key in STEP_FIELDS if key in extra)
            extra["_fields"] = one_line(fields)
            template += " <dim>[{extra[_fields]}]</dim>"
        if tracebacks and failed:
            return template + "\n{exception}"
        return template + "\n"

    return format_record


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
    return json.dumps(data, default=str, ensure_ascii=False).translate(_JSON_ESCAPES)


def _json_format(record: Record) -> str:
    # loguru formats the returned template with the record: the line goes in through an
    # extra, so braces inside the JSON are never read as placeholders.
    record["extra"]["_json"] = json_line(record)
    return "{extra[_json]}\n"


def add_sink(sink: TextIO, settings: LoggingSettings) -> int:
    """Write records to ``sink`` as ``settings`` say; return loguru's id of the sink."""
    plain = text_format(tracebacks=settings.level in _TRACEBACK_LEVELS)
    return logger.add(
        sink,
        level=settings.level,
        format=_json_format if settings.serialize else plain,
        colorize=False if settings.serialize else None,
        backtrace=False,
        diagnose=False,
    )


def configure_logging(settings: LoggingSettings) -> None:
    """Log to stderr at ``settings.level``; route stdlib logging through loguru."""
    logger.remove()
    add_sink(sys.stderr, settings)
    logging.basicConfig(handlers=[InterceptHandler()], level=logging.INFO, force=True)
    logging.getLogger("pykka").setLevel(logging.INFO)
    logging.getLogger("pykka").disabled = False
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # SQLAlchemy logs every statement at INFO; keep its warnings and errors only.
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
