"""The optional HTTP port: ``/health/live``, ``/health/ready``, ``/health`` and ``/metrics``.

HTTP is cheroot's (CherryPy's production WSGI server: HTTP/1.1, a small thread pool, a clean
stop from another thread); ``/metrics`` is prometheus-client's own WSGI app (content
negotiation, OpenMetrics, gzip). This module only routes. Its threads never touch an actor's
mailbox: everything they answer is read from plain state (see ``duplex.observability.metrics``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from cheroot.wsgi import Server
from loguru import logger
from prometheus_client import CollectorRegistry, make_wsgi_app

from duplex.errors import ConfigurationError
from duplex.worker.health import HealthSnapshot, details, readiness

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

_JSON = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]


def make_app(
    snapshot: Callable[[], HealthSnapshot], registry: CollectorRegistry
) -> WSGIApplication:
    """Return the WSGI app answering the four endpoints."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _json(start_response, "405 Method Not Allowed", {"error": "GET only"})
        if path == "/metrics":
            answer: Iterable[bytes] = metrics_app(environ, start_response)
            return answer
        if path == "/health/live":
            return _json(start_response, "200 OK", {"status": "alive"})
        if path in ("/health/ready", "/health"):
            try:
                current = snapshot()
            except Exception as exc:  # a bug here must still answer, and say not ready
                logger.exception("health check failed")
                return _json(
                    start_response,
                    "503 Service Unavailable",
                    {"status": "not_ready", "reasons": [f"health check failed: {exc}"]},
                )
            reasons = readiness(current)
            status = "200 OK" if not reasons else "503 Service Unavailable"
            if path == "/health":
                return _json(start_response, status, details(current))
            body = {"status": "ready" if not reasons else "not_ready", "reasons": reasons}
            return _json(start_response, status, body)
        return _json(
            start_response,
            "404 Not Found",
            {"error": f"no such endpoint: {path}", "endpoints": _ENDPOINTS},
        )

    return app


_ENDPOINTS = ["/health/live", "/health/ready", "/health", "/metrics"]


def _json(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body, indent=2).encode() + b"\n"
    start_response(status, [*_JSON, ("Content-Length", str(len(data)))])
    return [data]


class HttpServer:
    """A WSGI app served on a background thread, until ``stop``."""

    def __init__(
        self,
        host: str,
        port: int,
        app: WSGIApplication,
        *,
        threads: int = 4,
        settings_name: str = "observability.http_host/http_port",
        serves: str = "health, metrics",
    ) -> None:
        self.host = host
        self._server = Server((host, port), app, numthreads=threads, server_name="duplex")
        self._thread: threading.Thread | None = None
        self._settings_name = settings_name
        self._serves = serves

    def start(self) -> None:
        """Bind (raising ``ConfigurationError`` naming the address) and serve in the background."""
        try:
            self._server.prepare()
        except OSError as exc:
            address = f"{self.host}:{self._server.bind_addr[1]}"
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise ConfigurationError(
                f"{self._settings_name}: cannot listen on {address}: {reason}"
            ) from None
        self._thread = threading.Thread(target=self._server.serve, name="duplex-http", daemon=True)
        self._thread.start()
        shown = f"[{self.host}]" if ":" in self.host else self.host
        logger.info("serving http://{}:{}/ ({})", shown, self.port, self._serves)

    @property
    def port(self) -> int:
        """The port bound (the one chosen when ``observability.http_port`` is 0)."""
        address = self._server.bind_addr
        assert isinstance(address, tuple)
        return int(address[1])

    def stop(self) -> None:
        if self._thread is None:
            return
        self._server.stop()
        self._thread.join(timeout=5.0)
        self._thread = None
