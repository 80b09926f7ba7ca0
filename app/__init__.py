"""Duplex: a long-lived step worker with true, bounded parallelism (the dual-channel pattern).

The public API for handler authors::

    from app import step_handler, StepContext, PermanentError, RetryableError, subscribe

and for programs that submit work without running a worker::

    from app import Client
"""

from app.client import Client
from app.errors import DuplexError, PermanentError, RetryableError
from app.handlers import StepContext, step_handler
from app.messages import DomainEvent
from app.subscriptions import subscribe

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
