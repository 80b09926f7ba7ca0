"""The exception tree of Duplex.

    DuplexError                    root: every error Duplex raises on purpose
    ├── ConfigurationError         settings that cannot be used (bad value, unknown key)
    ├── TemplateError              a task template that cannot be loaded or is invalid
    ├── InputError                 other bad user input (JSON context, unknown task or step)
    ├── TransitionError            an operator command asked for an impossible state change
    ├── StorageError               the database failed; wraps the driver's exception
    │   └── SchemaNotReadyError    the database schema is not at head (run `duplex migrate`)
    ├── StartupError               start-up gave up: the database kept failing for
    │                              ``worker.startup_timeout_s``
    ├── WorkerCrashedError         an actor failed; the worker stopped in order
    ├── UncommittedResultsError    the worker stopped with results it could not commit
    ├── BrokerError                the relay's message broker failed; wraps pika's exception
    │   ├── BrokerUnavailableError cannot connect, or the connection or channel was lost:
    │   │                          back off and retry, nothing is counted against the event
    │   └── PublishRejectedError   the broker refused this one message (nack, unroutable):
    │                              counted against the event, dead-lettered after N
    └── StepError                  raised by handlers to say how their step failed
        ├── PermanentError         do not retry (error_type ``permanent_error``)
        └── RetryableError         retry, optionally after ``retry_after`` seconds
                                   (error_type ``retryable_error``)

The CLI prints any ``DuplexError`` as one line on stderr and exits non-zero.

Beside the tree: the stable ``error_type`` of every way an attempt can fail on Duplex's side
(a handler's own ``StepError`` names its type itself).
"""

from __future__ import annotations

import math

# A retry can be put off by at most 30 days.
MAX_RETRY_AFTER_S = 30 * 86400.0

# Stable error types of failed attempts (docs/architecture.md, Error types): stored in the
# step's ``error``, counted by the metrics, so never renamed.
HANDLER_ERROR = "handler_error"
HANDLER_TIMEOUT = "handler_timeout"
HANDLER_NOT_FOUND = "handler_not_found"
HANDLER_ABORTED = "handler_aborted"
HANDLER_WORKER_FAILED = "handler_worker_failed"
INVALID_RESULT = "invalid_result"
RESULT_TOO_LARGE = "result_too_large"
RESULT_UNSTORABLE = "result_unstorable"
SHUTDOWN_TIMEOUT = "shutdown_timeout"
WORKER_LOST = "worker_lost"
# The task's deadline (``max_duration``) passed while the attempt ran or waited; not retried.
TASK_DEADLINE_EXCEEDED = "task_deadline_exceeded"
# Dynamic workflows (docs/workflows.md): a wait step's signal did not come in time; a batch
# handler returned more items than ``worker.max_batch_items``.
WAIT_TIMEOUT = "wait_timeout"
BATCH_TOO_LARGE = "batch_too_large"
# An operator cancelled the task or the step while the attempt ran (``duplex cancel``); the
# step ends ``cancelled``, never retried (``duplex.commit.retry``).
CANCELLED = "cancelled"


class DuplexError(Exception):
    """Root of every error Duplex raises on purpose."""


class ConfigurationError(DuplexError):
    """Settings that cannot be used."""


class CheckpointRejected(DuplexError):
    """``ctx.checkpoint`` from an attempt that no longer holds its claim: nothing was saved."""


class TemplateError(DuplexError):
    """A task template that cannot be loaded or is invalid."""


class InputError(DuplexError):
    """Bad user input other than a template."""


class TransitionError(DuplexError):
    """An operator command that asks for an impossible state change."""


class StorageError(DuplexError):
    """The database failed; the driver's exception is the ``__cause__``.

    ``transient`` is True for failures that can pass (a lost connection, a lock held
    elsewhere, a deadlock) and False for those that fail the same way every time (refused data,
    a syntax error, a missing table, a misconfigured connection): retrying them cannot help.

    ``refused`` is True when the database refused the data itself (a constraint, a value it
    cannot store): the same statement with other data would pass. Only then may the commit
    path single out one outcome as unstorable; any other failure (a database read-only after
    a failover, a missing table) is kept and retried, never blamed on a result.
    """

    def __init__(self, message: str, *, transient: bool = True, refused: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.refused = refused


class SchemaNotReadyError(StorageError):
    """The database schema is missing or behind the code (waiting does not change that)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


class StartupError(DuplexError):
    """Start-up gave up: the database kept failing for ``worker.startup_timeout_s``."""


class WorkerCrashedError(DuplexError):
    """One of the worker's actors failed; the worker stopped in order rather than run crippled."""


class UncommittedResultsError(DuplexError):
    """The worker stopped with results it could not commit (the database was unreachable)."""


class BrokerError(DuplexError):
    """The relay's message broker failed; pika's exception is the ``__cause__``."""


class BrokerUnavailableError(BrokerError):
    """The broker cannot be reached, or the connection or channel went away."""


class PublishRejectedError(BrokerError):
    """The broker refused one message (a nack, or an unroutable return)."""


class StepError(DuplexError):
    """Raised by a handler to say how its step failed."""

    error_type = HANDLER_ERROR
    retryable = True


class PermanentError(StepError):
    """A failure that retrying cannot fix; the step goes to ``error`` at once."""

    error_type = "permanent_error"
    retryable = False


class RetryableError(StepError):
    """A failure worth retrying; ``retry_after`` (seconds) overrides the backoff."""

    error_type = "retryable_error"
    retryable = True

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        if retry_after is not None and not (
            math.isfinite(retry_after) and 0 <= retry_after <= MAX_RETRY_AFTER_S
        ):
            raise ValueError(
                f"retry_after must be between 0 and {MAX_RETRY_AFTER_S:.0f} seconds, "
                f"got {retry_after!r}"
            )
        self.retry_after = retry_after
