"""Duplex: a long-lived step worker with true, bounded parallelism (the dual-channel pattern).

The public API for handler authors::

    from app import step_handler, StepContext, PermanentError, RetryableError, subscribe

and for programs that submit work without running a worker::

    from app import Client

The names are loaded on first use (PEP 562): ``import app.<module>`` does not pull in
SQLAlchemy, so ``duplex run`` installs its stop signals within milliseconds of starting
(``app.__main__``), before any heavy import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.client import Client
    from app.errors import DuplexError, PermanentError, RetryableError
    from app.handlers import StepContext, step_handler
    from app.messages import DomainEvent
    from app.subscriptions import subscribe

# Public name -> the module that defines it.
_EXPORTS = {
    "Client": "app.client",
    "DomainEvent": "app.messages",
    "DuplexError": "app.errors",
    "PermanentError": "app.errors",
    "RetryableError": "app.errors",
    "StepContext": "app.handlers",
    "step_handler": "app.handlers",
    "subscribe": "app.subscriptions",
}

__all__ = [
    "Client",
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
        raise AttributeError(f"module 'app' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
