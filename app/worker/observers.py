"""What observes a worker from outside its actors, around one read-only view of its figures.

``metrics`` (``WorkerMetrics``) is that view; everything here reads it and nothing here asks
an actor anything: the Prometheus registry behind ``/metrics``, the health port, the
heartbeat (``duplex.worker.watchdog``) and the saturation warnings. The step tracer is here
too: it reads the database, never an actor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from duplex.observability.http import HttpServer, make_app
from duplex.observability.metrics import WorkerMetrics, worker_registry
from duplex.observability.queue import QueueProbe
from duplex.observability.saturation import SaturationMonitor
from duplex.observability.tracing import StepTracer
from duplex.settings import Settings
from duplex.storage.db import Database
from duplex.storage.queries import task_trace_context
from duplex.worker import health
from duplex.worker.health import HealthSnapshot, Phase
from duplex.worker.watchdog import Heartbeat


class Observers:
    """The observers of one worker, made before its actors start (``duplex run`` opens the
    health port while it migrates)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        worker_id: str,
        *,
        draining: Callable[[], bool],
        tracer_provider: Any = None,
    ) -> None:
        self.settings = settings
        self.db = db
        cfg = settings.observability
        relay = settings.relay.enabled
        self.metrics = WorkerMetrics(
            worker_id,
            queue=QueueProbe(
                lambda: health.read_queue(db, settings.worker.namespaces, relay=relay),
                cfg.queue_refresh_s,
            ),
            draining=draining,
        )
        self.registry = worker_registry(self.metrics)
        self.heartbeat = Heartbeat(
            db,
            worker_id,
            self.metrics,
            interval_s=settings.worker.heartbeat_interval_s,
            claim_timeout_s=settings.event_system.claim_timeout_s,
        )
        self.saturation = SaturationMonitor(cfg.saturation_interval_s, start=time.monotonic())
        self.tracer: StepTracer | None = None
        if cfg.tracing:
            self.tracer = StepTracer(self._trace_context, tracer_provider=tracer_provider)
        self.http: HttpServer | None = None

    def identity(self) -> dict[str, Any]:
        """What ``duplex workers`` shows of this worker on any machine: its id, its version and
        its slots in total."""
        return {
            "worker_id": self.metrics.worker_id,
            "version": self.metrics.version,
            "slots": self.settings.worker.max_concurrent_handlers,
        }

    def serve_http(self, snapshot: Callable[[], HealthSnapshot]) -> None:
        """Open the health and metrics port (``observability.http_port``), if configured and
        not open yet; a port that cannot be bound is a ``ConfigurationError``."""
        cfg = self.settings.observability
        if cfg.http_port is None or self.http is not None:
            return
        server = HttpServer(cfg.http_host, cfg.http_port, make_app(snapshot, self.registry))
        server.start()
        self.http = server

    def close_http(self) -> None:
        if self.http is not None:
            self.http.stop()
            self.http = None

    def health(
        self, *, phase: Phase, failure: str | None, actors: dict[str, bool], running: bool
    ) -> HealthSnapshot:
        """The health snapshot of the worker (``running``: its actors are up)."""
        return health.gather(
            self.metrics,
            phase=phase,
            failure=failure,
            actors=actors,
            database_error=health.database_error(self.db),
            heartbeat_age_s=self.heartbeat.age_s() if running else None,
            heartbeat_interval_s=self.heartbeat.interval_s,
            relay=self.settings.relay.enabled,
        )

    def _trace_context(self, task_uuid: str) -> dict[str, str] | None:
        with self.db.read() as conn:
            return task_trace_context(conn, task_uuid)
