"""The bundled dynamic example (``examples/order_dynamic.toml``) is a valid template whose every
handler ``examples.orders`` registers, and its decision and convergence read as the README
says: express above 100, the lines' quantities summed from ``ctx.batch_results``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from duplex.dynamic.directives import Decision
from duplex.handlers import BatchResult, registry
from duplex.templates import load_template
from examples import orders
from tests.cli.support import REPO_ROOT


def test_the_dynamic_example_declares_one_step_of_each_kind_with_registered_handlers() -> None:
    template = load_template(str(REPO_ROOT / "examples" / "order_dynamic.toml"))
    kinds = {step.name: step.kind for step in template.steps}
    assert (kinds["choose_shipping"], kinds["lines"], kinds["warehouse"]) == (
        "decision",
        "batch",
        "wait",
    )
    handlers = {step.handler for step in template.steps if step.handler is not None}
    assert {h for h in handlers if registry.resolve(h) is None} == set()


def test_the_decision_ships_express_above_100_and_the_total_sums_the_lines() -> None:
    def ctx(**values: Any) -> Any:
        return SimpleNamespace(**values)

    big = orders.choose_shipping(ctx(dependency_results={"validate": {"total": 150.0}}))
    small = orders.choose_shipping(ctx(dependency_results={"validate": {"total": 42.5}}))
    assert isinstance(big, Decision)
    assert (big.branches, small.branches) == (("ship_express",), ("ship_standard",))

    pages: list[int] = []

    def batch_results(worker: str, *, page_size: int) -> Any:
        assert worker == "pack_line"
        pages.append(page_size)
        return iter([BatchResult(i, "complete", {"sku": f"S{i}", "qty": i + 1}) for i in range(3)])

    total = orders.pack_total(ctx(batch_results=batch_results))
    assert total == {"lines": 3, "units": 6}
    assert pages == [500]
