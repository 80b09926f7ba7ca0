"""Flow control in ``/metrics``: what the concurrency keys and rate limits hold back now.

Gauges from the queue figures (read from SQL at most once per refresh, shared by scrapes):
the busiest concurrency keys' running attempts and held steps (at most 20 keys: a key per
customer would otherwise be a series per customer), and every rate limit's tokens. The waits
this worker's claims caused are the counter ``duplex_flow_control_waits``
(``duplex.observability.metrics``).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from duplex.observability.queue import QueueFigures


def flow_gauges(figures: QueueFigures) -> Iterator[Metric]:
    running = GaugeMetricFamily(
        "duplex_concurrency_key_running",
        "Attempts running now under a concurrency key (the busiest keys).",
        labels=["key"],
    )
    held = GaugeMetricFamily(
        "duplex_concurrency_key_held",
        "Steps held back now by a concurrency key at its limit (the busiest keys).",
        labels=["key"],
    )
    for key, runs, holds, _ in figures.keys:
        running.add_metric([key], runs)
        held.add_metric([key], holds)
    tokens = GaugeMetricFamily(
        "duplex_rate_limit_tokens",
        "Units a rate limit would let start now (`duplex limits list`).",
        labels=["name"],
    )
    for name, now in figures.tokens:
        tokens.add_metric([name], now)
    yield running
    yield held
    yield tokens
