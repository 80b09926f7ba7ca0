"""Traces (the optional extra ``duplex[tracing]``): a span per attempt and per commit batch.

* At submit, the trace context given (``Client.submit(..., trace_context=...)``, a W3C
  carrier such as ``{"traceparent": "00-…-…-01"}``) or else the caller's current context is
  stored with the task (``tasks.trace_context``).
* With ``observability.tracing = true``, every attempt of every step of the task is a span
  continuing that context (handler, attempt, outcome), so a workflow shows as one trace
  whichever workers run its steps. A task submitted with no context still shows as one
  trace: its trace id is the task's UUID (both are 128 bits), under a parent that is never
  exported.
* The attempt span is current while the handler runs, so spans the handler starts nest
  under it.
* Each commit batch is a span too: its parent is the first committed attempt's span, and it
  links to every other attempt it commits (a batch may hold attempts of several traces).

Duplex only uses the OpenTelemetry API: the application (or ``opentelemetry-instrument``)
installs the SDK and its exporters. Nothing here runs unless tracing is on, except
``current_carrier`` at submit, which costs one import check without OpenTelemetry.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from duplex.errors import ConfigurationError, InputError
from duplex.version import duplex_version

if TYPE_CHECKING:
    from duplex.handlers import Cancellation
    from duplex.messages import ClaimedStep, StepOutcome

Carrier = dict[str, str]
# Tasks whose stored trace context is kept in memory (one read per task, not per attempt).
_CACHE_SIZE = 10_000


def _otel() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


def current_carrier() -> Carrier | None:
    """Return the caller's current trace context as a W3C carrier, or None without one."""
    trace = _otel()
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    from opentelemetry.propagate import inject

    carrier: Carrier = {}
    inject(carrier)
    return carrier or None


def checked_carrier(carrier: object) -> Carrier | None:
    """Return ``carrier`` if it is a dict of strings (``traceparent``, ``tracestate``)."""
    if carrier is None:
        return None
    if not isinstance(carrier, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in carrier.items()
    ):
        raise InputError(
            'trace_context must be a dict of strings, e.g. {"traceparent": "00-…-…-01"}'
        )
    return dict(carrier)


class StepTracer:
    """Starts the attempt and commit spans; shared by the HandlerWorkers and the
    CompletionProcessor (its state is behind a lock, and only exists when tracing is on)."""

    def __init__(
        self,
        lookup: Callable[[str], Carrier | None],
        *,
        tracer_provider: Any = None,
    ) -> None:
        trace = _otel()
        if trace is None:
            raise ConfigurationError(
                "observability.tracing = true needs OpenTelemetry: "
                "pip install 'duplex[tracing]' (opentelemetry-api)"
            )
        self._trace = trace
        self._tracer = trace.get_tracer("duplex", duplex_version(), tracer_provider=tracer_provider)
        self._lookup = lookup
        self._lock = threading.Lock()
        self._carriers: OrderedDict[str, Carrier | None] = OrderedDict()
        # (step_uuid, attempt) -> the attempt span's context, until its result is committed.
        self._attempts: dict[tuple[str, int], Any] = {}

    @contextmanager
    def attempt(
        self, step: ClaimedStep, cancellation: Cancellation
    ) -> Iterator[Callable[[StepOutcome], None]]:
        """Run the attempt inside its span; call the yielded function with the outcome."""
        from opentelemetry.trace import Status, StatusCode

        attributes = {
            "duplex.task_uuid": step.task_uuid,
            "duplex.step_uuid": step.step_uuid,
            "duplex.step_name": step.name,
            "duplex.handler": step.handler,
            "duplex.attempt": step.attempt,
            "duplex.namespace": step.namespace,
            "duplex.worker_id": step.claimed_by,
        }
        with self._tracer.start_as_current_span(
            f"attempt {step.name}", context=self._parent(step.task_uuid), attributes=attributes
        ) as span:
            key = (step.step_uuid, step.attempt)
            with self._lock:
                self._attempts[key] = span.get_span_context()

            def record(outcome: StepOutcome) -> None:
                if cancellation.is_set():
                    # Timed out or abandoned: the committed outcome was Duplex's, not this.
                    span.set_attribute("duplex.outcome", "abandoned")
                    span.set_status(Status(StatusCode.ERROR, "attempt abandoned (timeout)"))
                elif outcome.failure is None:
                    span.set_attribute("duplex.outcome", "success")
                else:
                    span.set_attribute("duplex.outcome", outcome.failure.error_type)
                    span.set_status(Status(StatusCode.ERROR, outcome.failure.message[:200]))

            yield record

    @contextmanager
    def commit(self, outcomes: Sequence[StepOutcome]) -> Iterator[None]:
        """Run one commit transaction inside its span."""
        from opentelemetry.trace import Link, Status, StatusCode

        with self._lock:
            contexts = [
                self._attempts.pop((o.step.step_uuid, o.step.attempt), None) for o in outcomes
            ]
        known = [c for c in contexts if c is not None]
        if known:
            parent = self._trace.set_span_in_context(self._trace.NonRecordingSpan(known[0]))
        elif outcomes:  # attempts run elsewhere (recovered, or before a restart)
            parent = self._parent(outcomes[0].step.task_uuid)
        else:
            parent = None
        links = [Link(c) for c in known[1:]]
        with self._tracer.start_as_current_span(
            "commit",
            context=parent,
            links=links,
            attributes={
                "duplex.batch_size": len(outcomes),
                "duplex.step_uuids": [o.step.step_uuid for o in outcomes][:100],
            },
            record_exception=True,
        ) as span:
            try:
                yield
            except Exception as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
                # The batch is kept and retried: its attempts keep their spans for that try.
                with self._lock:
                    for outcome, context in zip(outcomes, contexts, strict=True):
                        if context is not None:
                            self._attempts[(outcome.step.step_uuid, outcome.step.attempt)] = context
                raise

    def _parent(self, task_uuid: str) -> Any:
        """The context every span of this task continues."""
        from opentelemetry.propagate import extract
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        carrier = self._carrier(task_uuid)
        if carrier:
            context = extract(carrier)
            if self._trace.get_current_span(context).get_span_context().is_valid:
                return context
        # No stored context: a parent derived from the task's UUID, the same in every worker.
        number = uuid.UUID(task_uuid).int
        span_context = SpanContext(
            trace_id=number,
            span_id=(number & 0xFFFF_FFFF_FFFF_FFFF) or 1,
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
        return self._trace.set_span_in_context(NonRecordingSpan(span_context))

    def _carrier(self, task_uuid: str) -> Carrier | None:
        with self._lock:
            if task_uuid in self._carriers:
                self._carriers.move_to_end(task_uuid)
                return self._carriers[task_uuid]
        carrier = self._lookup(task_uuid)  # outside the lock: a database read
        with self._lock:
            self._carriers[task_uuid] = carrier
            while len(self._carriers) > _CACHE_SIZE:
                self._carriers.popitem(last=False)
        return carrier
