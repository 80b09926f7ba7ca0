"""Prometheus metric families built from plain figures, for the collectors of ``/metrics``."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from duplex.observability.counters import Histograms, Key


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def counter(
    name: str, documentation: str, labels: list[str], values: dict[Key, float]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def histograms(
    name: str, documentation: str, labels: list[str], histograms: Histograms
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for key, histogram in sorted(histograms.snapshot(), key=lambda item: item[0]):
        buckets, total = histogram.cumulative()
        family.add_metric(list(key), buckets, total)
    return family
