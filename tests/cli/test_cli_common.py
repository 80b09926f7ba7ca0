"""What every ``duplex`` command shares (``duplex.cli.common``): the database opened, checked
and always disposed of; stop signals recorded rather than raised; one-line errors."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from duplex.cli import common
from duplex.cli.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    open_database,
    run_command,
    stop_signals_received,
)
from duplex.errors import InputError, SchemaNotReadyError, StorageError
from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from tests.conftest import make_settings, sqlite_database


class Recorded(Database):
    """A database that counts how often its engine was disposed of."""

    opened: list[Recorded] = []

    def __init__(self, settings: DatabaseSettings, **options: Any) -> None:
        super().__init__(settings, **options)
        self.disposed = 0
        Recorded.opened.append(self)

    def dispose(self) -> None:
        self.disposed += 1
        super().dispose()


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[Recorded]:
    Recorded.opened = []
    monkeypatch.setattr(common, "Database", Recorded)
    return Recorded.opened


def test_a_schema_not_at_head_is_refused_and_the_engine_disposed(
    tmp_path: Path, recorded: list[Recorded]
) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'empty.db'}")
    with (
        pytest.raises(SchemaNotReadyError, match="duplex migrate"),
        open_database(settings),
    ):
        pytest.fail("the block runs only on a schema at head")
    (db,) = recorded
    assert db.disposed == 1


def test_the_engine_is_disposed_after_the_block_however_it_ends(
    tmp_path: Path, recorded: list[Recorded]
) -> None:
    sqlite_database(tmp_path / "d.db").dispose()
    settings = make_settings(f"sqlite:///{tmp_path / 'd.db'}")
    with open_database(settings) as db, db.read():
        pass
    with pytest.raises(InputError), open_database(settings):
        raise InputError("bad input")
    assert [db.disposed for db in recorded] == [1, 1]


def test_without_the_check_an_empty_database_opens(
    tmp_path: Path, recorded: list[Recorded]
) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'empty.db'}")
    with open_database(settings, check_schema=False):
        pass
    assert recorded[0].disposed == 1


def test_an_unreachable_database_can_be_tolerated(
    recorded: list[Recorded], monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(_db: Database) -> None:
        raise StorageError("connection refused")

    monkeypatch.setattr(common, "ensure_schema_ready", unreachable)
    settings = make_settings("sqlite:///:memory:")
    seen: list[str] = []
    with open_database(settings, unavailable=lambda exc: seen.append(str(exc))):
        pass
    assert seen == ["connection refused"]
    with pytest.raises(StorageError), open_database(settings):
        pass
    assert [db.disposed for db in recorded] == [1, 1]


def test_a_stop_signal_is_recorded_and_the_previous_handlers_come_back() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_signals_received() as stop:
        assert not stop.wait(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
        assert stop.requested
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_wait_ends_when_it_is_woken() -> None:
    wake = threading.Event()
    threading.Timer(0.05, wake.set).start()
    with stop_signals_received() as stop:
        assert not stop.wait(30, wake)
        assert wake.is_set()


def test_errors_become_one_line_and_an_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    def fails(exc: BaseException) -> Any:
        def body() -> int:
            raise exc

        return body

    assert run_command(fails(InputError("no such template"))) == EXIT_ERROR
    assert run_command(fails(KeyboardInterrupt())) == EXIT_INTERRUPTED
    assert run_command(fails(ZeroDivisionError("oops"))) == EXIT_ERROR
    assert capsys.readouterr().err.splitlines() == [
        "duplex: error: no such template",
        "duplex: interrupted",
        "duplex: internal error: ZeroDivisionError: oops",
    ]
