"""The worker's schedule firer: a thread that fires due schedules every ``poll_interval_ms``.

Every worker runs one (``[schedules] enabled``); they may all race for the same fire time,
and each fire time still creates one task (``duplex.storage.schedule_firing``). It needs no
actor: it writes in its own transactions, then hands the committed ``schedule.fired`` events
to the publisher and nudges the intake, through the callables the worker gives it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from loguru import logger

from duplex.clock import utcnow
from duplex.errors import StorageError
from duplex.observability.counters import ScheduleMetrics
from duplex.schedules.sync import sync_directory
from duplex.settings import ScheduleSettings
from duplex.storage.db import Database
from duplex.storage.schedule_firing import FireReport, fire_due, has_due

# A round stops after this many transactions, so a stop never waits long for it.
MAX_TRANSACTIONS_PER_ROUND = 100


class SchedulePoller:
    """Fire due schedules in rounds; ``round`` is one look, for tests to drive."""

    def __init__(
        self,
        db: Database,
        worker_id: str,
        settings: ScheduleSettings,
        metrics: ScheduleMetrics,
        *,
        on_fired: Callable[[FireReport], None] = lambda report: None,
        templates_dir: Path | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.worker_id = worker_id
        self.settings = settings
        self.metrics = metrics
        self._on_fired = on_fired
        self._templates_dir = templates_dir
        self._clock = clock
        self._overdue_after = timedelta(milliseconds=settings.overdue_after_ms)

    def run(self, closing: threading.Event, stopping: Callable[[], bool] = lambda: False) -> None:
        """Sync the declared schedules, then fire every interval until ``closing`` is set
        or ``stopping()`` says the worker stops (a draining worker fires nothing more)."""
        self.sync()
        interval_s = self.settings.poll_interval_ms / 1000
        while not closing.is_set() and not stopping():
            self.round(closing)
            closing.wait(interval_s)

    def sync(self) -> None:
        """Sync the templates directory's ``[[schedules]]`` (a failure is logged)."""
        if self._templates_dir is None:
            return
        for attempt in (1, 2):
            try:
                sync_directory(self.db, self._templates_dir)
                return
            except StorageError as exc:
                # Two workers starting at once may add the same schedule: the second try
                # finds it.
                if attempt == 2:
                    logger.warning("schedules: could not sync declared schedules: {}", exc)

    def round(self, closing: threading.Event | None = None) -> int:
        """Fire what is due now, a batch per transaction; return the schedules acted on."""
        acted = 0
        for _ in range(MAX_TRANSACTIONS_PER_ROUND):
            if closing is not None and closing.is_set():
                break
            now = self._clock()
            try:
                with self.db.read() as conn:
                    if not has_due(conn, now=now):
                        break
                with self.db.write() as conn:
                    report = fire_due(
                        conn,
                        now=now,
                        worker_id=self.worker_id,
                        limit=self.settings.batch_size,
                        keep_fires=self.settings.keep_fires,
                    )
            except StorageError as exc:
                # Nothing of the batch was written; the next round tries again.
                logger.warning("schedules: firing failed: {}", exc)
                break
            except Exception:
                # A bug must not end the thread (this worker would never fire again): the
                # batch rolled back, it is logged, and the next round tries again.
                logger.exception("schedules: firing failed")
                break
            self._count(report)
            if report.fired or report.events:
                self._on_fired(report)
            acted += report.acted
            if report.acted < self.settings.batch_size:
                break
        return acted

    def _count(self, report: FireReport) -> None:
        m = self.metrics
        for fired in report.fired:
            m.fires.inc((fired.schedule,))
            if fired.late > self._overdue_after:
                m.overdue.inc((fired.schedule,))
        for name, _ in report.skipped:
            m.skips.inc((name, "overlap"))
        for name, count in report.missed:
            m.skips.inc((name, "missed"), count)
            logger.warning("schedule {}: {} fire time(s) missed the catch-up window", name, count)
