"""Duplex: a long-lived step worker with true, bounded parallelism (the dual-channel pattern).

The public API for handler authors::

    from duplex import step_handler, StepContext, PermanentError, RetryableError, subscribe
    from duplex import Decision, Batch   # what decision and batch steps return

and for programs that submit work without running a worker::

    from duplex import Client

The names are loaded on first use (PEP 562): ``import duplex.<module>`` does not pull in
SQLAlchemy, so ``duplex run`` installs its stop signals within milliseconds of starting
(``duplex.__main__``), before any heavy import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from duplex.client import Client
    from duplex.dynamic.directives import Batch, Decision
    from duplex.errors import DuplexError, PermanentError, RetryableError
    from duplex.handlers import StepContext, step_handler
    from duplex.messages import DomainEvent
    from duplex.subscriptions import subscribe

# Public name -> the module that defines it.
_EXPORTS = {
    "Batch": "duplex.dynamic.directives",
    "Client": "duplex.client",
    "Decision": "duplex.dynamic.directives",
    "DomainEvent": "duplex.messages",
    "DuplexError": "duplex.errors",
    "PermanentError": "duplex.errors",
    "RetryableError": "duplex.errors",
    "StepContext": "duplex.handlers",
    "step_handler": "duplex.handlers",
    "subscribe": "duplex.subscriptions",
}

__all__ = [
    "Batch",
    "Client",
    "Decision",
    "DomainEvent",
    "DuplexError",
    "PermanentError",
    "RetryableError",
    "StepContext",
    "step_handler",
    "subscribe",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'duplex' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
