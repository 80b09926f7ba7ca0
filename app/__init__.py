"""Duplex: a long-lived step worker with true, bounded parallelism (the dual-channel pattern).

The public API for handler authors::

    from app import step_handler, StepContext, PermanentError, RetryableError, subscribe
"""

from app.errors import DuplexError, PermanentError, RetryableError
from app.handlers import StepContext, step_handler
from app.messages import DomainEvent
from app.subscriptions import subscribe

__all__ = [
    "DomainEvent",
    "DuplexError",
    "PermanentError",
    "RetryableError",
    "StepContext",
    "step_handler",
    "subscribe",
]
