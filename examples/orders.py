"""Example handlers: order fulfilment.

validate -> (reserve_stock, charge in parallel) -> ship. The payment gateway turns the first
charge attempt away, so the step fails once and succeeds on its retry.

``order_dynamic.toml`` (docs/workflows.md) adds a decision (express or standard shipping), a
batch (one ``pack_line`` step per order line, summed by ``pack_total``) and a wait for the
warehouse's ``warehouse_confirmed`` signal.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from duplex import (
    Batch,
    Decision,
    DomainEvent,
    PermanentError,
    RetryableError,
    StepContext,
    step_handler,
    subscribe,
)


@step_handler("orders.validate")
def validate(ctx: StepContext) -> dict[str, Any]:
    order = ctx.task_context.get("order")
    if not isinstance(order, dict) or not order.get("items"):
        raise PermanentError("the task context has no order with items")
    time.sleep(0.3)
    total = order.get("total") or sum(i.get("price", 0) * i.get("qty", 1) for i in order["items"])
    return {"order_id": order["id"], "total": total, "lines": len(order["items"])}


@step_handler("orders.reserve_stock")
def reserve_stock(ctx: StepContext) -> dict[str, Any]:
    order = ctx.task_context["order"]
    time.sleep(0.5)
    reserved = [{"sku": i["sku"], "qty": i.get("qty", 1)} for i in order["items"]]
    ctx.emit("stock.reserved", {"order_id": order["id"], "items": reserved})
    return {"reserved": reserved}


@step_handler("orders.charge")
def charge(ctx: StepContext) -> dict[str, Any]:
    order = ctx.task_context["order"]
    total = ctx.dependency_results["validate"]["total"]
    if ctx.attempt == 1:
        ctx.logger.info("payment gateway busy; asking for a retry")
        raise RetryableError("payment gateway busy", retry_after=1.0)
    time.sleep(0.4)
    ctx.emit("payment.charged", {"order_id": order["id"], "total": total})
    return {"charged": total, "attempt": ctx.attempt}


@step_handler("orders.ship")
async def ship(ctx: StepContext) -> dict[str, Any]:
    order = ctx.task_context["order"]
    await asyncio.sleep(0.3)
    tracking = f"TRACK-{order['id']}"
    ctx.emit("order.shipped", {"order_id": order["id"], "tracking": tracking})
    # The template's declared event order.fulfilled carries this result: what its consumers
    # need (which order, and how it travels) goes here.
    return {"order_id": order["id"], "tracking": tracking}


# --- order_dynamic.toml -------------------------------------------------------------------

# Orders above this total travel express.
EXPRESS_FROM = 100


@step_handler("orders.choose_shipping")
def choose_shipping(ctx: StepContext) -> Decision:
    total = ctx.dependency_results["validate"]["total"]
    branch = "ship_express" if total > EXPRESS_FROM else "ship_standard"
    return Decision([branch], result={"total": total})


@step_handler("orders.book_courier")
def book_courier(ctx: StepContext) -> dict[str, Any]:
    order_id = ctx.task_context["order"]["id"]
    return {"service": ctx.inputs["service"], "booking": f"{ctx.inputs['service']}-{order_id}"}


@step_handler("orders.order_lines")
def order_lines(ctx: StepContext) -> Batch:
    # One item per line: each pack_line step gets its line in ctx.inputs["item"].
    return Batch(ctx.task_context["order"]["items"])


@step_handler("orders.pack_line")
def pack_line(ctx: StepContext) -> dict[str, Any]:
    line = ctx.inputs["item"]
    time.sleep(0.1)
    return {"sku": line["sku"], "qty": line.get("qty", 1)}


@step_handler("orders.pack_total")
def pack_total(ctx: StepContext) -> dict[str, Any]:
    # Read page by page: a batch of 100k lines is never in memory at once.
    packed = [item.result or {} for item in ctx.batch_results("pack_line", page_size=500)]
    return {"lines": len(packed), "units": sum(p.get("qty", 0) for p in packed)}


@step_handler("orders.dispatch")
def dispatch(ctx: StepContext) -> dict[str, Any]:
    # Exactly one shipping branch ran; the other was skipped and has no result.
    shipping = ctx.dependency_results.get("ship_express") or ctx.dependency_results["ship_standard"]
    confirmed = ctx.dependency_results["warehouse"]
    return {"booking": shipping["booking"], "dock": confirmed.get("dock")}


@subscribe("step.*")
def show_progress(event: DomainEvent) -> None:
    p = event.payload
    if event.name == "step.completed":
        print(f"  step {p['step_name']:<14} complete   (attempt {p['attempt']})", flush=True)
    else:
        print(
            f"  step {p['step_name']:<14} failed     (attempt {p['attempt']}, "
            f"{p['error_type']}: {p['message']}) -> {p['state']}",
            flush=True,
        )


@subscribe("payment.*")
@subscribe("order.*")
@subscribe("stock.*")
def announce(event: DomainEvent) -> None:
    print(f"  event {event.name}: {event.payload}", flush=True)
