"""Local wake-ups on SQLite (``duplex.intake.wake``): the worker's socket listener, the sender,
and the addresses they share through the ``workers`` table.

The listener runs its real thread on a real socket; tests synchronise on ``threading.Event``
and on the order a datagram socket keeps (a datagram is in the receiver's queue when
``sendto`` returns), never on sleeps.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from duplex.clock import utcnow
from duplex.intake import wake
from duplex.intake.wake import WakeListener, Waker, bind_wake_socket, sockaddr, wake_local_workers
from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.workers import (
    mark_worker_stopped,
    record_wake_address,
    register_worker,
    wake_addresses,
)

HOST = socket.gethostname()
WAIT_S = 10.0
LONG_AGO = utcnow().replace(year=2000)  # a heartbeat cutoff every registered worker meets


def add_worker(db: Database, worker_id: str, address: str | None, *, hostname: str = HOST) -> None:
    with db.write() as conn:
        register_worker(conn, worker_id, hostname=hostname, pid=os.getpid(), now=utcnow())
        if address is not None:
            record_wake_address(conn, worker_id, address)


class Calls:
    """``on_work`` for a listener: counts its calls; ``hold`` makes the next one wait."""

    def __init__(self) -> None:
        self.count = 0
        self.called = threading.Condition()
        self._held: threading.Event | None = None
        self.holding = threading.Event()

    def __call__(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self.holding.set()
            held.wait(WAIT_S)
        with self.called:
            self.count += 1
            self.called.notify_all()

    def hold(self) -> threading.Event:
        self._held = threading.Event()
        self.holding.clear()
        return self._held

    def wait_for(self, count: int) -> None:
        with self.called:
            assert self.called.wait_for(lambda: self.count >= count, WAIT_S), self.count
        assert self.count == count


class Receiver:
    """A bare datagram socket standing in for a worker's."""

    def __init__(self) -> None:
        self.sock, self.address, self._directory = bind_wake_socket()

    def received(self) -> list[bytes]:
        got = []
        while True:
            try:
                got.append(self.sock.recv(4096, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


def receiver(made: list[Receiver]) -> Receiver:
    made.append(Receiver())
    return made[-1]


# --- the listener ---------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [True, False], ids=["abstract", "path"])
def test_the_listener_records_its_address_looks_once_then_wakes_on_a_datagram(
    sqlite_db: Database, abstract: bool
) -> None:
    add_worker(sqlite_db, "w1", None)
    calls = Calls()
    listener = WakeListener(sqlite_db, "w1", ["default"], calls, abstract=abstract)
    listener.start()
    try:
        calls.wait_for(1)  # the look after recording: what came before was announced to nobody
        address = listener.address
        assert address is not None
        assert address.startswith("@duplex-wake-") if abstract else address.startswith("/")
        with sqlite_db.read() as conn:
            assert wake_addresses(conn, hostname=HOST, heartbeat_cutoff=LONG_AGO) == [address]
        Waker(sqlite_db, claim_timeout_s=30).wake(["default"])
        calls.wait_for(2)
    finally:
        listener.stop()


@pytest.mark.parametrize("abstract", [True, False], ids=["abstract", "path"])
def test_stop_ends_the_thread_closes_the_socket_and_frees_the_address(
    sqlite_db: Database, abstract: bool
) -> None:
    add_worker(sqlite_db, "w1", None)
    calls = Calls()
    listener = WakeListener(sqlite_db, "w1", ["default"], calls, abstract=abstract)
    listener.start()
    calls.wait_for(1)
    address = listener.address
    assert address is not None
    listener.stop()
    assert not listener._thread.is_alive()
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
            probe.sendto(b"", sockaddr(address))
        if abstract:
            probe.bind(sockaddr(address))  # the name is free again
        else:
            assert not Path(address).parent.exists()  # its private directory is gone
    finally:
        probe.close()
    listener.stop()  # a second stop is harmless


def test_a_burst_of_datagrams_is_read_as_one_wake_up(receivers: list[Receiver]) -> None:
    listening = receiver(receivers)
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    served = frozenset({"default"})
    try:
        for datagram in (b"billing", b"default", b"billing", b"default"):
            sender.sendto(datagram, sockaddr(listening.address))
        assert wake.read_burst(listening.sock, served)
        assert listening.received() == []  # all four read by that one call
        for datagram in (b"billing", b"reports"):
            sender.sendto(datagram, sockaddr(listening.address))
        assert not wake.read_burst(listening.sock, served)
        assert listening.received() == []
    finally:
        sender.close()


def test_only_datagrams_naming_a_served_namespace_or_none_wake() -> None:
    served = frozenset({"default", "reports"})
    assert wake.names_served(b"", served)
    assert wake.names_served(b"reports", served)
    assert wake.names_served(b"billing\ndefault", served)
    assert not wake.names_served(b"billing", served)
    assert not wake.names_served(b"\xff\xfe", served)


def test_the_listener_wakes_once_for_what_queued_while_it_was_busy(sqlite_db: Database) -> None:
    add_worker(sqlite_db, "w1", None)
    calls = Calls()
    listener = WakeListener(sqlite_db, "w1", ["default"], calls)
    listener.start()
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)  # as the Waker's: a full queue never blocks
    try:
        calls.wait_for(1)
        assert listener.address is not None
        target = sockaddr(listener.address)
        release = calls.hold()
        sender.sendto(b"default", target)
        assert calls.holding.wait(WAIT_S)  # the listener is inside on_work for that one
        for _ in range(5):
            sender.sendto(b"default", target)
        release.set()
        calls.wait_for(3)
    finally:
        sender.close()
        listener.stop()
    assert calls.count == 3  # after the stop: the first look, the held one, the five as one


def test_a_listener_whose_receiver_is_gone_ends_its_thread(sqlite_db: Database) -> None:
    add_worker(sqlite_db, "w1", None)

    def gone() -> None:
        raise RuntimeError("the intake stopped")

    listener = WakeListener(sqlite_db, "w1", ["default"], gone)
    listener.start()
    listener._thread.join(WAIT_S)
    assert not listener._thread.is_alive()
    listener.stop()


def test_a_socket_that_cannot_be_bound_leaves_the_worker_polling(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*, abstract: bool) -> tuple[socket.socket, str, Path | None]:
        raise PermissionError("sockets forbidden here")

    monkeypatch.setattr(wake, "bind_wake_socket", refuse)
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        listener = WakeListener(sqlite_db, "w1", ["default"], lambda: None)
        listener.start()
        listener.stop()
    finally:
        logger.remove(sink)
    assert not listener._thread.is_alive()
    assert any("cannot take local wake-ups" in line and "only polls" in line for line in lines)


# --- the sender -----------------------------------------------------------------------------


def test_the_waker_sends_to_each_live_worker_of_this_host_and_ignores_dead_addresses(
    sqlite_db: Database, receivers: list[Receiver]
) -> None:
    alive_1, alive_2, stopped, elsewhere = (receiver(receivers) for _ in range(4))
    add_worker(sqlite_db, "a-dead-address", "@duplex-wake-nobody-listens")
    add_worker(sqlite_db, "b-missing-file", "/nonexistent/duplex-wake/s")
    add_worker(sqlite_db, "c-alive", alive_1.address)
    add_worker(sqlite_db, "d-alive", alive_2.address)
    add_worker(sqlite_db, "e-stopped", stopped.address)
    add_worker(sqlite_db, "f-no-address", None)
    add_worker(sqlite_db, "g-elsewhere", elsewhere.address, hostname="another-host")
    with sqlite_db.write() as conn:
        mark_worker_stopped(conn, "e-stopped", now=utcnow(), stats={})

    waker = Waker(sqlite_db, claim_timeout_s=30)
    try:
        waker.wake(["default", "reports", "default"])
    finally:
        waker.close()

    assert alive_1.received() == [b"default\nreports"]
    assert alive_2.received() == [b"default\nreports"]
    assert stopped.received() == []
    assert elsewhere.received() == []


def test_a_silent_worker_is_not_woken(sqlite_db: Database, receivers: list[Receiver]) -> None:
    silent = receiver(receivers)
    add_worker(sqlite_db, "w1", silent.address)
    wake_local_workers(sqlite_db, claim_timeout_s=-1.0)  # every heartbeat is too old
    assert silent.received() == []


def test_the_waker_keeps_the_addresses_for_a_second(
    sqlite_db: Database, receivers: list[Receiver]
) -> None:
    first, late = receiver(receivers), receiver(receivers)
    add_worker(sqlite_db, "w1", first.address)
    now = [100.0]
    waker = Waker(sqlite_db, claim_timeout_s=30, clock=lambda: now[0])
    try:
        waker.wake()
        add_worker(sqlite_db, "w2", late.address)
        now[0] += 0.9
        waker.wake()
        assert (len(first.received()), late.received()) == (2, [])  # read once: w2 is unheard
        now[0] += 0.2
        waker.wake()
        assert (first.received(), late.received()) == ([b""], [b""])
    finally:
        waker.close()


def test_waking_never_raises_when_the_database_cannot_be_read(tmp_path: Path) -> None:
    db = Database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'no-schema.db'}"))
    try:
        wake_local_workers(db, claim_timeout_s=30, namespaces=["default"])
    finally:
        db.dispose()


def test_a_reregistered_worker_loses_the_address_of_its_earlier_run(sqlite_db: Database) -> None:
    add_worker(sqlite_db, "w1", "@duplex-wake-earlier-run")
    add_worker(sqlite_db, "w1", None)
    with sqlite_db.read() as conn:
        assert wake_addresses(conn, hostname=HOST, heartbeat_cutoff=LONG_AGO) == []


def test_a_waker_on_postgresql_sends_nothing(postgres_db: Database) -> None:
    waker = Waker(postgres_db, claim_timeout_s=30)
    assert waker._sock is None  # PostgreSQL's wake-up is the work notification
    waker.wake(["default"])
    waker.close()


def test_a_read_that_finds_no_worker_is_not_kept(
    sqlite_db: Database, receivers: list[Receiver]
) -> None:
    """A worker records its wake address just after its row: a submitter that read between
    the two wakes it at its next submission, not a second later."""
    starting = receiver(receivers)
    now = [100.0]
    waker = Waker(sqlite_db, claim_timeout_s=30, clock=lambda: now[0])
    try:
        waker.wake()  # no worker has an address yet
        add_worker(sqlite_db, "w1", starting.address)
        now[0] += 0.1
        waker.wake()
        assert starting.received() == [b""]
    finally:
        waker.close()
