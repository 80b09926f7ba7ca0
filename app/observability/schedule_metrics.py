"""The schedule firer's figures in ``/metrics``: fires, skips and overdue fires per schedule."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric

from duplex.observability.counters import Key, ScheduleMetrics


def schedule_metrics(schedules: ScheduleMetrics) -> Iterator[Metric]:
    """Yield ``duplex_schedule_fires``, ``duplex_schedule_skips`` and
    ``duplex_schedule_overdue_fires`` (counters, labelled by schedule)."""
    yield _counter(
        "duplex_schedule_fires",
        "Fire times of schedules that this worker fired (each created its task).",
        ["schedule"],
        schedules.fires.snapshot(),
    )
    yield _counter(
        "duplex_schedule_skips",
        "Fire times not fired: reason overlap (previous run unfinished) or missed (later "
        "than the catch-up window).",
        ["schedule", "reason"],
        schedules.skips.snapshot(),
    )
    yield _counter(
        "duplex_schedule_overdue_fires",
        "Fires made later than schedules.overdue_after_ms after their fire time.",
        ["schedule"],
        schedules.overdue.snapshot(),
    )


def _counter(
    name: str, documentation: str, labels: list[str], values: dict[Key, float]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family
