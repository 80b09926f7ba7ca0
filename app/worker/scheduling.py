"""The worker's schedule firer thread (``duplex.schedules.poller``), wired to its actors.

After a fire commits, its ``schedule.fired`` events go to the publisher (in-process
subscribers, and a wake-up for the relay) and the intake is nudged for the new tasks.
"""

from __future__ import annotations

import threading
from typing import Protocol

from duplex.actors.supervised import tell
from duplex.observability.metrics import WorkerMetrics
from duplex.schedules.poller import SchedulePoller
from duplex.settings import Settings
from duplex.storage.db import Database
from duplex.storage.schedule_firing import FireReport
from duplex.worker.flow import Actors


class FiringWorker(Protocol):
    """What the firer needs of the ``Worker`` (a Protocol: wiring imports this module)."""

    settings: Settings
    db: Database
    worker_id: str
    metrics: WorkerMetrics

    @property
    def phase(self) -> str: ...


def schedule_firer(
    worker: FiringWorker, actors: Actors, closing: threading.Event
) -> list[threading.Thread]:
    """The firer's thread (not started), or none when ``[schedules] enabled`` is false.

    It fires until ``closing`` is set or the worker begins to stop.
    """
    settings = worker.settings
    if not settings.schedules.enabled:
        return []
    namespaces = set(settings.worker.namespaces)

    def fired(report: FireReport) -> None:
        if report.events:
            tell(actors.publisher.publish, report.events)
        if report.namespaces & namespaces:
            tell(actors.event_system.nudge)

    poller = SchedulePoller(
        worker.db,
        worker.worker_id,
        settings.schedules,
        worker.metrics.schedules,
        on_fired=fired,
        templates_dir=settings.templates.directory,
    )
    thread = threading.Thread(
        target=poller.run,
        args=(closing, lambda: worker.phase != "running"),
        name="duplex-schedules",
    )
    return [thread]
