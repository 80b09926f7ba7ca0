"""One log record is one line, in plain text and in JSON, whatever its message holds.

Records go through the sink ``configure_logging`` installs (``add_sink``, the same formats and
options), written to a ``StringIO``. The last test makes a real driver error: it terminates the
PostgreSQL backend of a real LISTEN thread, whose psycopg message spans several lines.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from loguru import logger
from sqlalchemy import create_engine, text

from duplex.observability.logs import InterceptHandler, add_sink
from duplex.settings import LoggingSettings
from duplex.storage.listen import ChannelListener
from tests.conftest import POSTGRES_URL, require_postgres, wait_until

DRIVER_TEXT = (
    "consuming input failed: server closed the connection unexpectedly\n"
    "\tThis probably means the server terminated abnormally\n"
    "\tbefore or while processing the request."
)


class Captured:
    """What one sink wrote, as lines."""

    def __init__(self, settings: LoggingSettings) -> None:
        self.settings = settings
        self._out = io.StringIO()
        self._sink = add_sink(self._out, settings)

    @property
    def text(self) -> str:
        return self._out.getvalue()

    def lines(self) -> list[str]:
        return self.text.splitlines()

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines()]

    def close(self) -> None:
        logger.remove(self._sink)


def capture(serialize: bool, level: str = "INFO") -> Captured:
    return Captured(LoggingSettings(serialize=serialize, level=level))


@pytest.fixture(params=[False, True], ids=["plain", "json"])
def sink(request: pytest.FixtureRequest) -> Iterator[Captured]:
    captured = capture(request.param)
    yield captured
    captured.close()


@pytest.fixture
def stdlib_logger() -> Iterator[logging.Logger]:
    """A stdlib logger routed into loguru the way ``configure_logging`` routes pykka's."""
    std = logging.getLogger(f"tests.logs.{uuid.uuid4().hex[:8]}")
    handler = InterceptHandler()
    std.addHandler(handler)
    std.propagate = False
    std.setLevel(logging.INFO)
    yield std
    std.removeHandler(handler)


def test_a_message_with_line_breaks_and_tabs_is_one_line(sink: Captured) -> None:
    logger.warning("LISTEN connection lost on {} ({}); retrying", "duplex_work", DRIVER_TEXT)
    (line,) = sink.lines()
    if sink.settings.serialize:
        assert json.loads(line)["message"] == (
            f"LISTEN connection lost on duplex_work ({DRIVER_TEXT}); retrying"
        )
    else:
        assert line.endswith(
            "LISTEN connection lost on duplex_work (consuming input failed: server closed the "
            "connection unexpectedly\\n\\tThis probably means the server terminated abnormally"
            "\\n\\tbefore or while processing the request.); retrying"
        )
        assert " WARNING " in line


@given(message=st.text())
def test_any_message_and_field_is_one_line(message: str) -> None:
    for serialize in (False, True):
        captured = capture(serialize)
        try:
            logger.bind(step_uuid=message, task_uuid="t").error(message)
        finally:
            captured.close()
        assert captured.text.endswith("\n")
        (line,) = captured.text[:-1].split("\n")
        assert len(line.splitlines()) == 1  # nor \r, \x85, \u2028, \u2029 (str.splitlines)
        if serialize:
            record = json.loads(line)
            assert (record["message"], record["step_uuid"]) == (message, message)
        else:
            assert not any(char in line for char in "\x1b\r\t\x00"), line


def test_a_terminal_escape_in_a_message_is_written_as_text() -> None:
    captured = capture(False)
    try:
        logger.info("name: {}", "\x1b[2J\x1b[31mred")
    finally:
        captured.close()
    assert captured.lines()[0].endswith("name: \\x1b[2J\\x1b[31mred")


def test_a_stdlib_record_with_line_breaks_is_one_line_with_its_caller(
    sink: Captured, stdlib_logger: logging.Logger
) -> None:
    def report() -> None:
        stdlib_logger.error("Unhandled exception in %s:\n%s", "Actor", "detail")

    report()
    (line,) = sink.lines()
    if sink.settings.serialize:
        record = json.loads(line)
        assert record["message"] == "Unhandled exception in Actor:\ndetail"
        assert record["logger"] == stdlib_logger.name
        assert record["function"] == "report"
    else:
        assert line.endswith(f"{stdlib_logger.name} Unhandled exception in Actor:\\ndetail")


def raise_boom() -> None:
    raise ValueError("boom\nsecond line")


RAISED_AT = f"{__file__}:{raise_boom.__code__.co_firstlineno + 1} in raise_boom"


def test_an_exception_is_one_line_with_its_summary_and_json_keeps_the_traceback(
    sink: Captured, stdlib_logger: logging.Logger
) -> None:
    try:
        raise_boom()
    except ValueError:
        logger.exception("step failed")
        stdlib_logger.exception("pykka report")
    lines = sink.lines()
    assert len(lines) == 2, sink.text
    if sink.settings.serialize:
        for record in sink.records():
            trace = str(record["exception"])
            assert trace.startswith("Traceback (most recent call last)")
            assert trace.endswith("ValueError: boom\nsecond line")
            assert "in raise_boom" in trace
    else:
        for line, message in zip(lines, ("step failed", "pykka report"), strict=True):
            head, summary = line.split(" | ")
            assert head.endswith(message)
            assert summary == f"ValueError: boom\\nsecond line (at {RAISED_AT})"


def test_plain_text_at_debug_shows_the_traceback_after_the_line() -> None:
    captured = capture(False, level="DEBUG")
    try:
        try:
            raise_boom()
        except ValueError:
            logger.opt(exception=True).debug("unexpected error")
    finally:
        captured.close()
    first, *trace = captured.lines()
    assert first.endswith(f"unexpected error | ValueError: boom\\nsecond line (at {RAISED_AT})")
    assert trace[0] == "Traceback (most recent call last):"
    assert trace[-2:] == ["ValueError: boom", "second line"]


@pytest.mark.postgres
@pytest.mark.parametrize("serialize", [False, True], ids=["plain", "json"])
def test_a_listen_connection_terminated_by_the_server_is_logged_on_one_line(
    serialize: bool,
) -> None:
    """The driver's own message, with its line breaks, from the LISTEN thread's code path."""
    require_postgres()
    app_name = f"duplex-test-listen-{uuid.uuid4().hex[:8]}"
    url = f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}application_name={app_name}"
    connected = threading.Event()
    listener = ChannelListener(
        url,
        f"duplex_test_{uuid.uuid4().hex[:8]}",
        on_connect=connected.set,
        on_notify=lambda _payload: None,
        name="test-listen",
        reconnect_max_s=0.5,
    )
    captured = capture(serialize)
    engine = create_engine(POSTGRES_URL)
    listener.start()
    try:
        assert connected.wait(10), "the listener never connected"
        with engine.connect() as conn:
            terminated = conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :name AND query LIKE 'LISTEN%'"
                ),
                {"name": app_name},
            ).scalars()
            assert list(terminated) == [True]
        wait_until(lambda: "LISTEN connection lost" in captured.text, 10)
    finally:
        listener.stop()
        captured.close()
        engine.dispose()
    lost = [line for line in captured.lines() if "LISTEN connection lost" in line]
    assert len(lost) == 1, captured.text
    if serialize:
        (record,) = (json.loads(line) for line in lost)
        message = str(record["message"])
    else:
        (message,) = lost
    # The driver's text really had line breaks (escaped in plain text, kept in JSON's string).
    assert ("\n" in message) if serialize else ("\\n" in message), message
    assert all(not line.startswith(("\t", " ")) for line in captured.lines()), captured.text
