"""Handlers for the batch end-to-end tests (``tests/e2e/test_batch_kill_e2e.py``); they run
inside ``duplex run`` subprocesses.

``batches.split`` returns ``inputs.n`` items (their numbers); ``batches.item`` returns its
item; ``batches.total`` sums every item's result through ``ctx.batch_results``.
"""

from __future__ import annotations

from typing import Any

from duplex import Batch, StepContext, step_handler


@step_handler("batches.split")
def split(ctx: StepContext) -> Batch:
    return Batch(range(int(ctx.inputs["n"])))


@step_handler("batches.item")
def item(ctx: StepContext) -> dict[str, Any]:
    return {"n": ctx.inputs["item"]}


@step_handler("batches.total")
def total(ctx: StepContext) -> dict[str, Any]:
    results = list(ctx.batch_results("item", page_size=1000))
    return {"count": len(results), "sum": sum(r.result["n"] for r in results if r.result)}
