"""Flow control in ``/metrics`` from a real worker: the steps its claims held back by a key
(``duplex_flow_control_waits``), the keys' running and held steps, and a limit's tokens.

A real in-process worker on SQLite, with handlers that block on an event until the scrape is
read, so that the moment measured (two running, three held) is made, not waited for.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from duplex.clock import utcnow
from duplex.flow.rates import parse_rate
from duplex.handlers import HandlerRegistry, StepContext
from duplex.observability.metrics import DuplexCollector
from duplex.storage.rate_limits import set_limit
from duplex.storage.submission import create_tasks
from duplex.templates import parse_template
from tests.actors.support import fresh_database, running_worker
from tests.conftest import wait_until

KEYED = parse_template(
    'name = "sync"\n[[steps]]\nname = "s"\nhandler = "flow.block"\n'
    'concurrency = { key = "context.customer", limit = 2 }\n'
)


def scrape(collector: DuplexCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }


def test_a_worker_reports_what_flow_control_holds_back() -> None:
    release = threading.Event()
    entered: list[str] = []
    registry = HandlerRegistry()

    def block(ctx: StepContext) -> dict[str, str]:
        entered.append(ctx.step_uuid)
        assert release.wait(30)
        return {}

    registry.register("flow.block", block)
    with fresh_database() as db:
        with db.write() as conn:
            set_limit(conn, "crm", parse_rate("5/s", burst=1), now=utcnow(), operator="test")
            create_tasks(conn, KEYED, [{"customer": "acme"}] * 5, now=utcnow())
        try:
            with running_worker(db, 4, registry) as (worker, _):
                worker.nudge()
                # The StepExecutor counts the waits after it hands the claim on: both made.
                waits_counted = worker.metrics.flow_waits.snapshot
                assert wait_until(lambda: len(entered) == 2 and sum(waits_counted().values()) == 3)
                collector = DuplexCollector(worker.metrics)
                values = scrape(collector)
                release.set()
        finally:
            release.set()
    waits = (
        "duplex_flow_control_waits_total",
        (("kind", "concurrency_key"), ("name", "context.customer")),
    )
    assert values[waits] == 3
    key = (("key", "context.customer=acme"),)
    assert values[("duplex_concurrency_key_running", key)] == 2
    assert values[("duplex_concurrency_key_held", key)] == 3
    assert values[("duplex_rate_limit_tokens", (("name", "crm"),))] == 2.0
