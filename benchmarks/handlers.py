"""Handlers for benchmark runs in a ``duplex run`` subprocess (``worker.handler_modules``)."""

from __future__ import annotations

from duplex import StepContext, step_handler


@step_handler("bench.noop")
def noop(ctx: StepContext) -> None:
    """Do nothing: what is measured is Duplex's own cost per step."""
