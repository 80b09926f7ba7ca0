"""Local wake-ups on SQLite: a datagram tells this host's workers to look for work now.

On PostgreSQL a worker learns of new work from the work notification
(``duplex.storage.listen``). SQLite has no server to carry one, so a worker on SQLite takes
wake-ups on a Unix datagram socket (``WakeListener``) and records its address in its
``workers`` row (``wake_address``). Whoever makes work ready on this host outside a worker
(the ``Client``, ``duplex submit``, ``duplex retry`` and ``resolve``, the dashboard) sends one
datagram, after its commit, to each worker of the host that the liveness rule finds alive in
SQL (``Waker``). A datagram holds the namespaces of the new work, one a line; an empty one
means any namespace.

A wake-up is a hint, never a promise: sending never raises and never waits (a worker gone, a
socket missing, a full queue are ignored), and the worker's poll remains the fallback.

Addresses: on Linux a name in the abstract namespace, ``@duplex-wake-<pid>-<random>`` (``@``
stands for the leading NUL byte, as ``ss -x`` shows it). It goes with the socket, even when
the process is killed, so nothing is left behind to clean up, a dead worker's address refuses
a datagram at once, and no directory's path length or permissions matter. Elsewhere the
socket is a file in a private temporary directory (mode 0700), removed on stop.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

from loguru import logger

from duplex.clock import utcnow
from duplex.errors import StorageError
from duplex.storage.db import Database
from duplex.storage.workers import heartbeat_cutoff, record_wake_address, wake_addresses

# The abstract namespace is Linux's alone.
ABSTRACT = sys.platform.startswith("linux")
# A socket file's path must fit sun_path with its NUL: 104 bytes on macOS and the BSDs.
_MAX_PATH_BYTES = 100
# Namespaces are short names; a longer datagram is cut here and still wakes.
_MAX_DATAGRAM = 4096
# How often the receiving thread looks whether it should stop, should the datagram that
# stop sends it be lost.
_STOP_CHECK_S = 1.0
# Backoff while the database refuses to record the address (polling covers the gap).
_RECORD_RETRY_S = (0.2, 5.0)
# How long a Waker keeps the addresses it read.
CACHE_S = 1.0


def sockaddr(address: str) -> str:
    """The socket address of a recorded wake address (``@name`` is abstract)."""
    return "\0" + address[1:] if address.startswith("@") else address


def bind_wake_socket(*, abstract: bool = ABSTRACT) -> tuple[socket.socket, str, Path | None]:
    """Bind a datagram socket for wake-ups; return it, its address as recorded, and the
    private directory that holds it (None for an abstract address)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    directory: Path | None = None
    try:
        if abstract:
            address = f"@duplex-wake-{os.getpid()}-{secrets.token_hex(4)}"
        else:
            parent = tempfile.gettempdir()
            if len(os.fsencode(parent)) + 30 > _MAX_PATH_BYTES:
                parent = "/tmp"  # a deep $TMPDIR would not fit in sun_path
            directory = Path(tempfile.mkdtemp(prefix="duplex-wake-", dir=parent))
            address = str(directory / "s")
        sock.bind(sockaddr(address))
    except OSError:
        sock.close()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return sock, address, directory


def names_served(datagram: bytes, served: Collection[str]) -> bool:
    """Whether a wake-up concerns a worker serving ``served``: it names one, or none."""
    if not datagram:
        return True
    return any(name in served for name in datagram.decode("utf-8", "replace").split("\n"))


def read_burst(sock: socket.socket, served: Collection[str]) -> bool:
    """Read a datagram (waiting for one) and every one queued behind it, so that a burst is
    one wake-up; return whether any of them concerns ``served``."""
    wanted = names_served(sock.recv(_MAX_DATAGRAM), served)
    while True:
        try:
            datagram = sock.recv(_MAX_DATAGRAM, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return wanted
        wanted = names_served(datagram, served) or wanted


class WakeListener:
    """Takes this worker's wake-ups on a thread and calls ``on_work``, once per burst.

    ``start`` binds the socket. The thread then records the address in the worker's row
    (retrying while the database refuses), calls ``on_work`` once, since what was committed
    before a sender could read the address was announced to nobody, and from then on once for
    every burst of datagrams that names a namespace of ``namespaces`` (or none): datagrams that
    queued while it was busy are read together. ``stop`` closes the socket, which frees the
    address. A socket that cannot be bound is logged, and the worker only polls. When
    ``on_work`` raises, the receiver is gone (stopping) and the thread ends.
    """

    def __init__(
        self,
        db: Database,
        worker_id: str,
        namespaces: Collection[str],
        on_work: Callable[[], None],
        *,
        abstract: bool = ABSTRACT,
    ) -> None:
        self._db = db
        self._worker_id = worker_id
        self._served = frozenset(namespaces)
        self._on_work = on_work
        self._abstract = abstract
        self._stop = threading.Event()
        # Set once the first look (after recording the address) was signalled: what a worker
        # was told before it took wake-ups has been looked at (``EventSystem.listener_settled``).
        self.first_look = threading.Event()
        self._sock: socket.socket | None = None
        self._directory: Path | None = None
        self.address: str | None = None
        self._thread = threading.Thread(target=self._run, name="duplex-wake", daemon=True)

    def start(self) -> None:
        try:
            self._sock, self.address, self._directory = bind_wake_socket(abstract=self._abstract)
        except OSError as exc:
            logger.warning("cannot take local wake-ups ({}); this worker only polls", exc)
            return
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self.address is not None:
            with contextlib.suppress(OSError):  # wake the thread out of its wait
                sock.sendto(b"", sockaddr(self.address))
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        sock.close()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)

    def _run(self) -> None:
        sock = self._sock
        if sock is None or not self._record() or not self._signal():
            return
        self.first_look.set()
        while not self._stop.is_set():
            try:
                readable, _, _ = select.select([sock], [], [], _STOP_CHECK_S)
                if not readable:
                    continue
                wanted = read_burst(sock, self._served)
            except (OSError, ValueError) as exc:  # ValueError: closed by ``stop``
                if not self._stop.is_set():
                    logger.warning("local wake-ups failed ({}); this worker only polls", exc)
                return
            if wanted and not self._stop.is_set() and not self._signal():
                return

    def _record(self) -> bool:
        """Record the address in the worker's row; False if stopped first."""
        assert self.address is not None
        delay, longest = _RECORD_RETRY_S
        while not self._stop.is_set():
            try:
                with self._db.write() as conn:
                    record_wake_address(conn, self._worker_id, self.address)
                return True
            except StorageError as exc:
                logger.warning(
                    "could not record the wake address ({}); retrying in {:.1f}s", exc, delay
                )
                self._stop.wait(delay)
                delay = min(longest, delay * 2)
        return False

    def _signal(self) -> bool:
        try:
            self._on_work()
        except Exception:  # the receiver is gone (stopping); nothing left to wake
            self._stop.set()
            return False
        return True


class Waker:
    """Sends wake-ups to this host's live workers; on PostgreSQL it does nothing.

    The addresses are read from the ``workers`` table by the liveness rule's SQL half and kept
    for ``cache_s``. A worker that records its address meanwhile is not woken by this Waker
    until then: it finds that work at its next poll, or at the look it takes once its address
    is recorded if the work was committed before that. A read that finds no address is not
    kept: a worker starting records its address just after its row, and a submitter that read
    between the two would otherwise leave it to its poll for a second.
    """

    def __init__(
        self,
        db: Database,
        *,
        claim_timeout_s: float,
        cache_s: float = CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._claim_timeout_s = claim_timeout_s
        self._cache_s = cache_s
        self._clock = clock
        self._hostname = socket.gethostname()
        self._cached: tuple[float, list[str]] | None = None
        self._sock: socket.socket | None = None
        if db.is_sqlite:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # A worker whose queue is full has wake-ups waiting already: never wait for it.
                self._sock.setblocking(False)
            except OSError as exc:
                logger.debug("no local wake-ups: {}", exc)

    def wake(self, namespaces: Iterable[str] = ()) -> None:
        """Send one datagram to each live worker of this host; never raises, never waits."""
        if self._sock is None:
            return
        payload = "\n".join(sorted(set(namespaces))).encode()[:_MAX_DATAGRAM]
        try:
            addresses = self._addresses()
        except StorageError as exc:
            logger.debug("no local wake-ups: {}", exc)
            return
        for address in addresses:
            # Gone, never bound, or its queue is full: that worker polls.
            with contextlib.suppress(OSError):
                self._sock.sendto(payload, sockaddr(address))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _addresses(self) -> list[str]:
        now = self._clock()
        cached = self._cached
        if cached is not None and now < cached[0]:
            return cached[1]
        with self._db.read() as conn:
            addresses = wake_addresses(
                conn,
                hostname=self._hostname,
                heartbeat_cutoff=heartbeat_cutoff(utcnow(), self._claim_timeout_s),
            )
        if addresses:
            self._cached = (now + self._cache_s, addresses)
        return addresses


def wake_local_workers(
    db: Database, *, claim_timeout_s: float, namespaces: Iterable[str] = ()
) -> None:
    """Wake this host's live workers once (a command that made work ready); never raises."""
    waker = Waker(db, claim_timeout_s=claim_timeout_s, cache_s=0.0)
    try:
        waker.wake(namespaces)
    finally:
        waker.close()
