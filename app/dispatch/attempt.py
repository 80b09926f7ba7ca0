"""Run one attempt of a step and turn whatever happens into a ``StepOutcome``.

Plain code, no actors: the HandlerWorker actor calls ``run_attempt`` on its own thread.
Every way a handler can end becomes a result with a stable ``error_type``; nothing escapes.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from duplex.clock import utcnow
from duplex.dynamic.directives import Batch, Decision, read_return_value
from duplex.dynamic.kinds import HANDLER
from duplex.errors import CANCELLED as CANCELLED_ERROR
from duplex.errors import (
    HANDLER_ABORTED,
    HANDLER_ERROR,
    HANDLER_NOT_FOUND,
    HANDLER_TIMEOUT,
    INVALID_RESULT,
    RESULT_TOO_LARGE,
    RESULT_UNSTORABLE,
    TASK_DEADLINE_EXCEEDED,
    StepError,
)
from duplex.handlers import Cancellation, Handler, HandlerRegistry, StepContext, StepStore
from duplex.messages import ClaimedStep, JSONDict, StepFailure, StepOutcome


def run_attempt(
    step: ClaimedStep,
    registry: HandlerRegistry,
    *,
    timeout_s: float,
    cancellation: Cancellation,
    max_result_bytes: int,
    clock: Callable[[], datetime] = utcnow,
    max_batch_items: int = 100_000,
    store: StepStore | None = None,
) -> StepOutcome:
    """Run ``step``'s handler once and describe how it ended.

    ``store`` is where ``ctx.checkpoint`` writes and a convergence reads its batch's results.
    """
    started_at = clock()
    handler = registry.resolve(step.handler)
    if handler is None:
        failure = StepFailure(
            HANDLER_NOT_FOUND,
            f"no handler registered as {step.handler!r} (check worker.handler_modules)",
            retryable=False,
        )
        return StepOutcome(step, started_at, clock(), failure=failure)

    ctx = StepContext(
        task_uuid=step.task_uuid,
        step_uuid=step.step_uuid,
        step_name=step.name,
        task_context=step.task_context,
        inputs=step.inputs,
        dependency_results=step.dependency_results,
        attempt=step.attempt,
        max_attempts=step.max_attempts,
        deadline=started_at + timedelta(seconds=timeout_s),
        deadline_monotonic=time.monotonic() + timeout_s,
        cancelled=cancellation,
        worker_id=step.claimed_by,
        checkpoint_state=step.checkpoint_state,
        skipped_dependencies=step.skipped_dependencies,
        claim=step,
        store=store,
    )
    try:
        value = _call(handler, ctx, cancellation, is_async=registry.is_async(step.handler))
    except StepError as exc:
        failure = StepFailure(
            exc.error_type,
            _message(exc),
            retryable=exc.retryable,
            retry_after=getattr(exc, "retry_after", None),
        )
        return StepOutcome(step, started_at, clock(), failure=failure, events=tuple(ctx.events))
    except asyncio.CancelledError:
        # Our own cancellation after a timeout; the timeout result was already sent, and
        # this one will be rejected by the commit guard.
        error_type = HANDLER_TIMEOUT if cancellation.is_set() else HANDLER_ABORTED
        failure = StepFailure(error_type, "handler was cancelled", retryable=True)
        return StepOutcome(step, started_at, clock(), failure=failure)
    except Exception as exc:
        failure = StepFailure(HANDLER_ERROR, _message(exc), retryable=True, traceback=_traceback())
        return StepOutcome(step, started_at, clock(), failure=failure, events=tuple(ctx.events))
    except BaseException as exc:
        # SystemExit, KeyboardInterrupt and friends would kill the worker's thread (and pykka
        # stops every actor on a BaseException); a handler that does this has a bug a retry
        # will repeat.
        failure = StepFailure(
            HANDLER_ABORTED,
            f"handler raised {type(exc).__name__}: {exc}",
            retryable=False,
            traceback=_traceback(),
        )
        return StepOutcome(step, started_at, clock(), failure=failure)

    branches = items = None
    if step.kind != HANDLER or isinstance(value, Decision | Batch):
        directive = read_return_value(value, step.kind, step.spec, max_batch_items=max_batch_items)
        if isinstance(directive, StepFailure):
            return StepOutcome(
                step, started_at, clock(), failure=directive, events=tuple(ctx.events)
            )
        value, branches, items = directive.result, directive.branches, directive.items
    normalised = encode_result(value, max_result_bytes)
    if isinstance(normalised, StepFailure):
        return StepOutcome(step, started_at, clock(), failure=normalised, events=tuple(ctx.events))
    result, encoded = normalised
    return StepOutcome(
        step,
        started_at,
        clock(),
        result=result,
        events=tuple(ctx.events),
        result_json=encoded,
        branches=branches,
        items=items,
    )


def _call(handler: Handler, ctx: StepContext, cancellation: Cancellation, *, is_async: bool) -> Any:
    if is_async:
        return asyncio.run(_run_cancellable(handler, ctx, cancellation))
    value = handler(ctx)
    if inspect.isawaitable(value):  # a sync callable that returned a coroutine
        return asyncio.run(_await_cancellable(value, cancellation))
    return value


async def _run_cancellable(handler: Handler, ctx: StepContext, cancellation: Cancellation) -> Any:
    return await _await_cancellable(handler(ctx), cancellation)


async def _await_cancellable(awaitable: Any, cancellation: Cancellation) -> Any:
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(awaitable)
    # Cancelling from the dispatcher's thread must go through the loop's thread.

    def cancel_task() -> None:
        loop.call_soon_threadsafe(task.cancel)

    cancellation.set_canceller(cancel_task)
    try:
        return await task
    finally:
        cancellation.set_canceller(None)


def normalise_result(value: Any, max_result_bytes: int) -> JSONDict | StepFailure:
    """Turn a handler's return value into the step's result dict, or say why it can't be."""
    normalised = encode_result(value, max_result_bytes)
    return normalised if isinstance(normalised, StepFailure) else normalised[0]


def encode_result(value: Any, max_result_bytes: int) -> tuple[JSONDict, str] | StepFailure:
    """Like ``normalise_result``, with the result's JSON text as it is stored (encoded once)."""
    if value is None and max_result_bytes >= 2:
        return {}, "{}"  # the common case: a handler that returns nothing
    result: Any
    if value is None:
        result = {}
    elif isinstance(value, BaseModel):
        result = value.model_dump(mode="json")
    elif isinstance(value, dict):
        result = value
    else:
        result = {"result": value}
    try:
        encoded = json.dumps(result, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        return StepFailure(
            INVALID_RESULT, f"result is not JSON-serialisable: {exc}", retryable=False
        )
    # Hand on exactly what a reader of the database will get back (int keys become strings,
    # tuples lists), so events and stored results never differ in shape.
    result = json.loads(encoded)
    if _has_nul(encoded):
        return StepFailure(
            INVALID_RESULT,
            "result contains a NUL character, which the database cannot store",
            retryable=False,
        )
    try:
        size = len(encoded.encode("utf-8"))
    except UnicodeEncodeError:
        return StepFailure(
            INVALID_RESULT,
            "result contains text that is not valid Unicode (a lone surrogate)",
            retryable=False,
        )
    if size > max_result_bytes:
        return StepFailure(
            RESULT_TOO_LARGE,
            f"result is {size} bytes, over the limit of {max_result_bytes}",
            retryable=False,
        )
    assert isinstance(result, dict)
    return result, encoded


def _has_nul(encoded_json: str) -> bool:
    # json.dumps writes NUL as \u0000; PostgreSQL refuses it in JSONB and text.
    return "\\u0000" in encoded_json.replace("\\\\", "")


def storable_text(text: str) -> str:
    """Return ``text`` with NUL characters spelled out, so any database accepts it."""
    # Lone surrogates (e.g. from undecodable file names) cannot be stored as UTF-8 either.
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def unstorable(outcome: StepOutcome, exc: Exception) -> StepOutcome:
    """Return a permanent failure for an attempt whose result the database refused."""
    failure = StepFailure(
        RESULT_UNSTORABLE,
        storable_text(f"the database refused this result: {exc}"),
        retryable=False,
    )
    return StepOutcome(outcome.step, outcome.started_at, outcome.finished_at, failure=failure)


def timeout_failure(timeout_s: float) -> StepFailure:
    """Return the failure committed when an attempt runs past its deadline."""
    return StepFailure(HANDLER_TIMEOUT, f"handler ran longer than {timeout_s:g}s", retryable=True)


def deadline_failure(deadline_at: datetime | None, *, ran: bool) -> StepFailure:
    """Return the failure committed when the task's deadline (``max_duration``) stops an
    attempt (``ran``: while it ran; else before it could start). Never retried: the task is
    over."""
    when = deadline_at.isoformat() if deadline_at is not None else "?"
    what = "while this attempt ran" if ran else "before this attempt could start"
    return StepFailure(
        TASK_DEADLINE_EXCEEDED,
        f"the task's deadline (max_duration) passed at {when} {what}",
        retryable=False,
    )


def cancel_failure(step: ClaimedStep, *, step_only: bool, ran: bool, now: datetime) -> StepFailure:
    """Return the failure committed when an operator cancelled the attempt (``duplex cancel``
    of its task, or of the step when ``step_only``), ``ran``: while it ran, else before it
    could start. Never retried (the step ends ``cancelled``, ``duplex.commit.retry``).

    A task past its deadline was cancelled by the deadline, not by an operator: the attempt
    keeps the deadline's error type, as it would have had a moment later from its own timer.
    """
    if step.deadline_at is not None and step.deadline_at <= now:
        return deadline_failure(step.deadline_at, ran=ran)
    what = "step" if step_only else "task"
    when = "while this attempt ran" if ran else "before this attempt could start"
    return StepFailure(
        CANCELLED_ERROR,
        f"cancelled by operator (duplex cancel of the {what}) {when}",
        retryable=False,
    )


def _message(exc: BaseException) -> str:
    text = storable_text(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _traceback() -> str:
    return storable_text(traceback.format_exc())
