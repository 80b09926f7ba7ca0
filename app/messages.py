"""The messages actors exchange: small, frozen, typed.

Rows become these objects at the SQL boundary; nothing mutable crosses a mailbox.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

JSONDict = dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeclaredEvent:
    """A domain event a step's template declared, with when to emit it, as a claim carries it.

    Read from the step's stored ``declared_events``; the template's own, validated form is
    ``duplex.templates.EventDeclaration``.
    """

    name: str
    condition: Literal["success", "failure", "always"] = "success"


@dataclass(frozen=True, slots=True)
class RetryOverride:
    """The fields of the retry policy a step's ``[steps.retry]`` sets (None: the worker's).

    Stored as the step's ``retry_policy`` JSON; the template's validated form is
    ``duplex.templates.StepRetryPolicy``, the policy it modifies ``duplex.commit.retry``'s.
    """

    strategy: Literal["exponential", "linear", "fixed"] | None = None
    base_ms: int | None = None
    multiplier: float | None = None
    max_ms: int | None = None
    jitter: float | None = None

    @classmethod
    def from_json(cls, raw: Any) -> RetryOverride | None:
        """Read a stored ``retry_policy`` (None or ``{}``: no override); unknown keys are
        ignored, so a row written by a newer version still runs."""
        if not raw or not isinstance(raw, dict):
            return None
        return cls(
            strategy=raw.get("strategy"),
            base_ms=raw.get("base_ms"),
            multiplier=raw.get("multiplier"),
            max_ms=raw.get("max_ms"),
            jitter=raw.get("jitter"),
        )


@dataclass(frozen=True, slots=True)
class ClaimedStep:
    """One attempt of a step, claimed by this worker and ready to run."""

    step_uuid: str
    task_uuid: str
    name: str
    handler: str
    attempt: int
    max_attempts: int
    retryable: bool
    timeout_ms: int | None
    claimed_by: str
    inputs: JSONDict = field(default_factory=dict)
    task_context: JSONDict = field(default_factory=dict)
    dependency_results: dict[str, JSONDict] = field(default_factory=dict)
    declared_events: tuple[DeclaredEvent, ...] = ()
    # Whether a step depends on this one. Unknown (True) costs a readiness check at commit;
    # the claim knows, and saves it for the steps nothing depends on.
    has_children: bool = True
    # For metrics: the namespace label, and the times that latencies are measured from.
    # Delivery metadata, not the attempt's identity: left out of equality.
    namespace: str = field(default="default", compare=False)
    claimed_at: datetime | None = field(default=None, compare=False)
    submitted_at: datetime | None = field(default=None, compare=False)
    # The step's own retry policy (``[steps.retry]``), if its template set one.
    retry_policy: RetryOverride | None = field(default=None, compare=False)
    # When the task must be finished (``max_duration``): the attempt is cancelled then.
    deadline_at: datetime | None = field(default=None, compare=False)
    # Dynamic workflows (docs/workflows.md): the step's kind and what it declared (a
    # decision's branches...), the state the last accepted checkpoint saved, and the
    # parents a decision skipped (not in ``dependency_results``).
    kind: str = field(default="handler", compare=False)
    spec: JSONDict | None = field(default=None, compare=False)
    checkpoint_state: Any = field(default=None, compare=False)
    skipped_dependencies: tuple[str, ...] = field(default=(), compare=False)
    # Its concurrency key (docs/flow-control.md): the commit of its result frees a slot of it.
    concurrency_key: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class EmittedEvent:
    """A domain event a handler emitted with ``ctx.emit``."""

    name: str
    payload: JSONDict


@dataclass(frozen=True, slots=True)
class StepFailure:
    """Why an attempt failed; stored as the step's ``error`` JSON."""

    error_type: str
    message: str
    retryable: bool
    traceback: str | None = None
    retry_after: float | None = None

    def as_json(self) -> JSONDict:
        data: JSONDict = {
            "error_type": self.error_type,
            "message": self.message,
            "retryable": self.retryable,
        }
        if self.traceback is not None:
            data["traceback"] = self.traceback
        if self.retry_after is not None:
            data["retry_after"] = self.retry_after
        return data


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """The result of one attempt: exactly one of ``result`` or ``failure`` is set."""

    step: ClaimedStep
    started_at: datetime
    finished_at: datetime
    result: JSONDict | None = None
    failure: StepFailure | None = None
    events: tuple[EmittedEvent, ...] = ()
    # ``result`` as JSON text, when the handler's path already encoded it to check it.
    result_json: str | None = None
    # A decision's chosen branches, a batch's items (``duplex.dynamic.directives``): applied
    # by the commit that stores the result, in its transaction.
    branches: tuple[str, ...] | None = None
    items: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if (self.result is None) == (self.failure is None):
            raise ValueError("a StepOutcome has exactly one of result or failure")

    @property
    def succeeded(self) -> bool:
        return self.failure is None


@dataclass(frozen=True, slots=True)
class DomainEvent:
    """A committed domain event, as stored in ``domain_events``."""

    event_id: str
    name: str
    task_uuid: str
    step_uuid: str | None
    payload: JSONDict
    created_at: datetime
    # Commit order within the task (``domain_events.sequence``).
    sequence: int = 0


# Commands routed by the CommandProcessor.


@dataclass(frozen=True, slots=True)
class ExecuteReadySteps:
    """Claim up to ``limit`` ready steps and dispatch them."""

    limit: int


@dataclass(frozen=True, slots=True)
class Status:
    """Report what the worker is doing."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Stop intake and drain."""


Command = ExecuteReadySteps | Status | Shutdown
