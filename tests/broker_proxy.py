"""A TCP proxy between AMQP clients and RabbitMQ that a test can hold.

Clients connect to ``BrokerProxy.url`` instead of the broker. Bytes from a client always
reach the broker; bytes from the broker reach the clients only while the proxy is not held.
A relay publishing through a held proxy therefore gets its messages to the broker (they are
routed to the queues) but never sees a publisher confirm, so it marks nothing published:
the state "committed, maybe delivered, not confirmed" lasts exactly as long as the test
wants, however fast or slow the machine is.

``hold_at_publish(n)`` holds the proxy at the moment the ``n``-th ``Basic.Publish`` (counted
over every client connection since the call) passes towards the broker, before the broker
has it: the first ``n - 1`` messages were confirmed, the ``n``-th one is in the broker's
queues and unconfirmed. (The proxy reads the AMQP frame headers going to the broker for
that; it changes no byte.)

A client waiting for a confirm through a held proxy does not give up for a while: pika
closes a connection only after hearing nothing for the heartbeat timeout plus 5 s (the
broker proposes 60 s), and a new connection's handshake cannot complete while held.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

import pika

from tests.relay_support import RABBITMQ_URL

PROTOCOL_HEADER = 8  # "AMQP\x00\x00\x09\x01", sent by the client before any frame
FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size; then payload, 0xCE
METHOD_FRAME = 1
BASIC_PUBLISH = (60, 40)  # class id, method id


class PublishCounter:
    """Follows the client-to-broker byte stream of one connection, frame by frame, and
    calls ``on_publish`` as soon as a frame is known to be a ``Basic.Publish`` (its first 11
    bytes are in), before those bytes are forwarded."""

    def __init__(self, on_publish: Callable[[], None]) -> None:
        self._on_publish = on_publish
        self._skip = PROTOCOL_HEADER  # bytes still to pass before the next frame starts
        self._start = b""  # the current frame's first bytes: its header, then the method ids

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                continue
            wanted = self._wanted()
            take = wanted - len(self._start)
            self._start += bytes(view[:take])
            view = view[take:]
            if len(self._start) < wanted or self._wanted() > wanted:
                continue  # more of the frame's start to come (now, or with the next chunk)
            kind, _channel, size = FRAME_HEADER.unpack_from(self._start)
            ids = self._start[FRAME_HEADER.size :]
            if kind == METHOD_FRAME and struct.unpack(">HH", ids) == BASIC_PUBLISH:
                self._on_publish()
            self._skip = size - len(ids) + 1  # the rest of the payload and the frame-end
            self._start = b""

    def _wanted(self) -> int:
        """How many first bytes of the current frame tell what it is."""
        if len(self._start) < FRAME_HEADER.size:
            return FRAME_HEADER.size
        kind, _channel, size = FRAME_HEADER.unpack_from(self._start)
        return FRAME_HEADER.size + 4 if kind == METHOD_FRAME and size >= 4 else FRAME_HEADER.size


class BrokerProxy:
    """Forwards 127.0.0.1:<port> to RabbitMQ; ``hold``/``release`` the broker's replies."""

    def __init__(self, target: tuple[str, int] | None = None) -> None:
        params = pika.URLParameters(RABBITMQ_URL)
        self.target = target or (params.host, params.port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = RABBITMQ_URL.replace(
            f"@{params.host}:{params.port}/", f"@127.0.0.1:{self.port}/"
        )
        assert self.url != RABBITMQ_URL, f"cannot point {RABBITMQ_URL} at the proxy"
        self._lock = threading.Condition()
        self._held = False
        self._sending = 0  # broker-to-client sends in progress
        self._hold_at: int | None = None
        self.publishes = 0  # Basic.Publish frames seen since the last hold_at_publish
        self.held = threading.Event()
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="broker-proxy", daemon=True)
        self._acceptor.start()

    # --- what a test does ------------------------------------------------------------------

    def hold(self) -> None:
        """Stop the broker's bytes; returns once none is on its way to a client."""
        with self._lock:
            self._held = True
            self.held.set()
            while self._sending:
                self._lock.wait()

    def release(self) -> None:
        """Let the broker's bytes through again, those held first."""
        with self._lock:
            self._held = False
            self._hold_at = None
            self.held.clear()
            self._lock.notify_all()

    def hold_at_publish(self, n: int) -> None:
        """Hold as the ``n``-th publish from now passes towards the broker (see module doc)."""
        assert n >= 1
        with self._lock:
            self.publishes = 0
            self._hold_at = n

    def broker_side_names(self) -> list[str]:
        """The broker's names of the proxy's open connections (``rabbitmqctl
        list_connections name``): ``127.0.0.1:<port> -> <broker address>``."""
        with self._lock:
            upstreams = self._sockets[1::2]
        names = []
        for sock in upstreams:
            with contextlib.suppress(OSError):
                host, port = sock.getsockname()[:2]
                peer, peer_port = sock.getpeername()[:2]
                names.append(f"{host}:{port} -> {peer}:{peer_port}")
        return names

    def close(self) -> None:
        """Stop listening and drop every connection."""
        with self._lock:
            self._closed = True
            self._held = False
            self._lock.notify_all()
            sockets, self._sockets = self._sockets, []
        self._listener.close()
        for sock in sockets:
            _close(sock)
        self._acceptor.join(timeout=5)

    # --- the forwarding --------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                # As pika does: no Nagle delay (40 ms a round trip) on small frames.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    _close(client)
                    _close(upstream)
                    return
                self._sockets += [client, upstream]
            counter = PublishCounter(self._published)
            threading.Thread(
                target=self._pipe, args=(client, upstream, counter.feed, False), daemon=True
            ).start()
            threading.Thread(
                target=self._pipe, args=(upstream, client, None, True), daemon=True
            ).start()

    def _published(self) -> None:
        with self._lock:
            self.publishes += 1
            if self._hold_at is not None and self.publishes >= self._hold_at:
                self._hold_at = None
                self._held = True
                self.held.set()
                while self._sending:
                    self._lock.wait()

    def _pipe(
        self,
        source: socket.socket,
        sink: socket.socket,
        inspect: Callable[[bytes], None] | None,
        from_broker: bool,
    ) -> None:
        try:
            while data := source.recv(65536):
                if inspect is not None:
                    inspect(data)  # may hold the proxy, before the broker sees these bytes
                if not from_broker:
                    sink.sendall(data)
                    continue
                with self._lock:
                    while self._held and not self._closed:
                        self._lock.wait()
                    self._sending += 1
                try:
                    sink.sendall(data)
                finally:
                    with self._lock:
                        self._sending -= 1
                        self._lock.notify_all()
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
