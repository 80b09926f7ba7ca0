"""The schedule firer's figures in ``/metrics``: fires, skips and overdue fires per schedule."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric

from duplex.observability.counters import ScheduleMetrics
from duplex.observability.families import counter


def schedule_metrics(schedules: ScheduleMetrics) -> Iterator[Metric]:
    """Yield ``duplex_schedule_fires``, ``duplex_schedule_skips`` and
    ``duplex_schedule_overdue_fires`` (counters, labelled by schedule)."""
    yield counter(
        "duplex_schedule_fires",
        "Fire times of schedules that this worker fired (each created its task).",
        ["schedule"],
        schedules.fires.snapshot(),
    )
    yield counter(
        "duplex_schedule_skips",
        "Fire times not fired: reason overlap (previous run unfinished) or missed (later "
        "than the catch-up window).",
        ["schedule", "reason"],
        schedules.skips.snapshot(),
    )
    yield counter(
        "duplex_schedule_overdue_fires",
        "Fires made later than schedules.overdue_after_ms after their fire time.",
        ["schedule"],
        schedules.overdue.snapshot(),
    )
