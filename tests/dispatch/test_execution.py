"""run_attempt and normalise_result: every way a handler ends becomes one StepOutcome."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from duplex.dispatch.attempt import cancel_failure, normalise_result, run_attempt
from duplex.errors import CANCELLED as CANCELLED_ERROR
from duplex.errors import (
    HANDLER_ABORTED,
    HANDLER_ERROR,
    HANDLER_NOT_FOUND,
    HANDLER_TIMEOUT,
    INVALID_RESULT,
    RESULT_TOO_LARGE,
    TASK_DEADLINE_EXCEEDED,
    PermanentError,
    RetryableError,
)
from duplex.handlers import Cancellation, HandlerRegistry, StepContext
from duplex.messages import ClaimedStep, EmittedEvent, StepFailure, StepOutcome

WAIT_S = 10.0
T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def make_step(handler: str = "t.handler", **overrides: Any) -> ClaimedStep:
    fields: dict[str, Any] = {
        "step_uuid": "00000000-0000-0000-0000-000000000001",
        "task_uuid": "00000000-0000-0000-0000-0000000000aa",
        "name": "step",
        "handler": handler,
        "attempt": 2,
        "max_attempts": 3,
        "retryable": True,
        "timeout_ms": None,
        "claimed_by": "worker-1",
        "inputs": {"in": 1},
        "task_context": {"order": {"id": 7}},
        "dependency_results": {"parent": {"total": 10}},
    }
    fields.update(overrides)
    return ClaimedStep(**fields)


def run(
    handler: Callable[[StepContext], Any],
    *,
    timeout_s: float = 30.0,
    max_result_bytes: int = 1_000_000,
    cancellation: Cancellation | None = None,
    clock: Callable[[], datetime] | None = None,
) -> StepOutcome:
    registry = HandlerRegistry()
    registry.register("t.handler", handler)
    kwargs: dict[str, Any] = {}
    if clock is not None:
        kwargs["clock"] = clock
    return run_attempt(
        make_step(),
        registry,
        timeout_s=timeout_s,
        # Not `or`: an unset Cancellation is falsy.
        cancellation=Cancellation() if cancellation is None else cancellation,
        max_result_bytes=max_result_bytes,
        **kwargs,
    )


def failure_of(outcome: StepOutcome) -> StepFailure:
    assert outcome.result is None
    assert outcome.failure is not None
    return outcome.failure


class Receipt(BaseModel):
    order_id: int
    at: datetime
    tags: list[str]


# --- normalise_result --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"a": 1, "b": [1, 2]}, {"a": 1, "b": [1, 2]}),
        (None, {}),
        ({}, {}),
        ([1, "x"], {"result": [1, "x"]}),
        (3, {"result": 3}),
        (2.5, {"result": 2.5}),
        ("done", {"result": "done"}),
        (True, {"result": True}),
        ({1: "a"}, {"1": "a"}),
        ((1, 2), {"result": [1, 2]}),
        ({"nested": {2: None}}, {"nested": {"2": None}}),
        ({"t": (1, 2)}, {"t": [1, 2]}),
    ],
)
def test_normalise_result_shapes(value: Any, expected: dict[str, Any]) -> None:
    result = normalise_result(value, 10_000)
    assert result == expected
    assert isinstance(result, dict)
    # What is stored is what a JSON reader gets back.
    assert json.loads(json.dumps(result)) == result


def test_normalise_result_dumps_a_pydantic_model_in_json_mode() -> None:
    value = Receipt(order_id=7, at=datetime(2030, 1, 1, tzinfo=UTC), tags=["a"])
    assert normalise_result(value, 10_000) == {
        "order_id": 7,
        "at": "2030-01-01T00:00:00Z",
        "tags": ["a"],
    }


def _circular() -> dict[str, Any]:
    value: dict[str, Any] = {}
    value["self"] = value
    return value


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        {"s": {1}},
        math.nan,
        {"x": math.inf},
        {"x": [1, -math.inf]},
        object(),
        {"when": datetime(2030, 1, 1, tzinfo=UTC)},
        b"bytes",
        {("tuple", "key"): 1},
    ],
    ids=["set", "nested-set", "nan", "inf", "nested-neg-inf", "object", "datetime", "bytes", "key"],
)
def test_normalise_result_rejects_non_json_values(value: Any) -> None:
    failure = normalise_result(value, 10_000)
    assert isinstance(failure, StepFailure)
    assert failure.error_type == INVALID_RESULT
    assert failure.retryable is False
    assert "JSON" in failure.message


def test_normalise_result_rejects_a_circular_result() -> None:
    failure = normalise_result(_circular(), 10_000)
    assert isinstance(failure, StepFailure)
    assert failure.error_type == INVALID_RESULT


def test_normalise_result_size_limit_is_inclusive() -> None:
    value = {"k": "x" * 100}
    size = len(json.dumps(value, separators=(",", ":")).encode())
    assert normalise_result(value, size) == value
    failure = normalise_result(value, size - 1)
    assert isinstance(failure, StepFailure)
    assert failure.error_type == RESULT_TOO_LARGE
    assert failure.retryable is False
    assert str(size) in failure.message


def test_normalise_result_counts_bytes_not_characters() -> None:
    value = {"k": "é" * 10}  # 1 character, 2 bytes each in UTF-8
    encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(encoded) > len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    assert isinstance(normalise_result(value, len(encoded)), dict)
    assert isinstance(normalise_result(value, len(encoded) - 1), StepFailure)


# Every JSON value a database can store: PostgreSQL refuses NUL characters in JSONB, and a lone
# surrogate (category Cs) is not valid Unicode text at all (both are invalid results, tested
# above).
storable_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | storable_text,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(storable_text.filter(lambda t: len(t) <= 5), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_normalise_result_accepts_every_json_value(value: Any) -> None:
    result = normalise_result(value, 1_000_000)
    assert isinstance(result, dict)
    expected = value if isinstance(value, dict) else {} if value is None else {"result": value}
    assert result == expected


# --- run_attempt: success ----------------------------------------------------------------------


def test_handler_sees_the_claimed_step() -> None:
    seen: dict[str, Any] = {}

    def handler(ctx: StepContext) -> dict[str, Any]:
        seen.update(
            task_uuid=ctx.task_uuid,
            step_uuid=ctx.step_uuid,
            step_name=ctx.step_name,
            task_context=ctx.task_context,
            inputs=ctx.inputs,
            dependency_results=ctx.dependency_results,
            attempt=ctx.attempt,
            max_attempts=ctx.max_attempts,
            cancelled=bool(ctx.cancelled),
        )
        ctx.logger.info("hello from the handler")
        return {"ok": True}

    outcome = run(handler)
    assert outcome.succeeded
    assert outcome.result == {"ok": True}
    step = make_step()
    assert seen == {
        "task_uuid": step.task_uuid,
        "step_uuid": step.step_uuid,
        "step_name": step.name,
        "task_context": {"order": {"id": 7}},
        "inputs": {"in": 1},
        "dependency_results": {"parent": {"total": 10}},
        "attempt": 2,
        "max_attempts": 3,
        "cancelled": False,
    }
    assert outcome.step == step
    assert outcome.started_at <= outcome.finished_at


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        (None, {}),
        ({"a": 1}, {"a": 1}),
        ([1, 2], {"result": [1, 2]}),
        ("text", {"result": "text"}),
        (
            Receipt(order_id=1, at=T0, tags=[]),
            {"order_id": 1, "at": "2030-01-02T03:04:05Z", "tags": []},
        ),
    ],
)
def test_return_value_is_normalised(returned: Any, expected: dict[str, Any]) -> None:
    outcome = run(lambda ctx: returned)
    assert outcome.result == expected
    assert outcome.failure is None


def test_emitted_events_are_kept_in_order() -> None:
    def handler(ctx: StepContext) -> None:
        ctx.emit("payment.charged", {"total": 10})
        ctx.emit("mail.sent")

    outcome = run(handler)
    assert outcome.result == {}
    assert outcome.events == (
        EmittedEvent("payment.charged", {"total": 10}),
        EmittedEvent("mail.sent", {}),
    )


def test_events_are_kept_when_the_handler_then_fails() -> None:
    def handler(ctx: StepContext) -> None:
        ctx.emit("progress", {"n": 1})
        raise RetryableError("flaky")

    outcome = run(handler)
    assert failure_of(outcome).error_type == "retryable_error"
    assert outcome.events == (EmittedEvent("progress", {"n": 1}),)


@pytest.mark.parametrize(
    "payload",
    [{"when": datetime(2030, 1, 1, tzinfo=UTC)}, {"x": math.nan}, {"s": {1, 2}}],
    ids=["datetime", "nan", "set"],
)
def test_emit_with_a_non_json_payload_fails_the_attempt_clearly(payload: dict[str, Any]) -> None:
    def handler(ctx: StepContext) -> dict[str, Any]:
        ctx.emit("bad.event", payload)
        return {"unreachable": True}

    outcome = run(handler)
    failure = failure_of(outcome)
    assert failure.error_type == HANDLER_ERROR
    assert "bad.event" in failure.message
    assert "not JSON-serialisable" in failure.message
    assert outcome.events == ()


def test_emit_with_an_empty_name_fails_the_attempt() -> None:
    def handler(ctx: StepContext) -> None:
        ctx.emit("", {})

    failure = failure_of(run(handler))
    assert failure.error_type == HANDLER_ERROR
    assert "event name" in failure.message


# --- run_attempt: failures ---------------------------------------------------------------------


def test_permanent_error_is_not_retryable() -> None:
    def handler(ctx: StepContext) -> None:
        raise PermanentError("card declined")

    failure = failure_of(run(handler))
    assert failure.error_type == "permanent_error"
    assert failure.retryable is False
    assert failure.message == "PermanentError: card declined"
    assert failure.retry_after is None


def test_retryable_error_keeps_retry_after() -> None:
    def handler(ctx: StepContext) -> None:
        raise RetryableError("rate limited", retry_after=12.5)

    failure = failure_of(run(handler))
    assert failure.error_type == "retryable_error"
    assert failure.retryable is True
    assert failure.retry_after == 12.5
    assert failure.as_json()["retry_after"] == 12.5
    assert "rate limited" in failure.message


def test_retryable_error_without_retry_after() -> None:
    def handler(ctx: StepContext) -> None:
        raise RetryableError()

    failure = failure_of(run(handler))
    assert failure.error_type == "retryable_error"
    assert failure.retry_after is None
    assert failure.message == "RetryableError"
    assert "retry_after" not in failure.as_json()


def test_other_exception_is_a_retryable_handler_error_with_traceback() -> None:
    def exploding_handler(ctx: StepContext) -> None:
        raise KeyError("missing")

    failure = failure_of(run(exploding_handler))
    assert failure.error_type == HANDLER_ERROR
    assert failure.retryable is True
    assert failure.message.startswith("KeyError")
    assert failure.traceback is not None
    assert "exploding_handler" in failure.traceback
    assert "KeyError" in failure.traceback
    assert failure.as_json()["traceback"] == failure.traceback


def test_unknown_handler_is_permanent_handler_not_found() -> None:
    outcome = run_attempt(
        make_step("no.such.handler"),
        HandlerRegistry(),
        timeout_s=1,
        cancellation=Cancellation(),
        max_result_bytes=1000,
    )
    failure = failure_of(outcome)
    assert failure.error_type == HANDLER_NOT_FOUND
    assert failure.retryable is False
    assert "no.such.handler" in failure.message


def test_handler_name_is_never_imported_by_path() -> None:
    # A dotted path to a real callable is still only looked up in the registry.
    outcome = run_attempt(
        make_step("os.getcwd"),
        HandlerRegistry(),
        timeout_s=1,
        cancellation=Cancellation(),
        max_result_bytes=1000,
    )
    assert failure_of(outcome).error_type == HANDLER_NOT_FOUND


@pytest.mark.parametrize("returned", [{1, 2}, math.nan, {"x": math.nan}, object()])
def test_non_json_return_value_is_invalid_result(returned: Any) -> None:
    failure = failure_of(run(lambda ctx: returned))
    assert failure.error_type == INVALID_RESULT
    assert failure.retryable is False


def test_oversized_result_is_result_too_large() -> None:
    failure = failure_of(run(lambda ctx: {"blob": "x" * 200}, max_result_bytes=100))
    assert failure.error_type == RESULT_TOO_LARGE
    assert failure.retryable is False


@pytest.mark.parametrize(
    "exc_factory",
    [lambda: SystemExit(3), lambda: KeyboardInterrupt(), lambda: GeneratorExit()],
    ids=["SystemExit", "KeyboardInterrupt", "GeneratorExit"],
)
def test_base_exception_is_handler_aborted_and_the_thread_survives(
    exc_factory: Callable[[], BaseException],
) -> None:
    exc = exc_factory()
    results: list[StepOutcome] = []
    escaped: list[BaseException] = []

    def handler(ctx: StepContext) -> None:
        raise exc

    def worker_thread() -> None:
        try:
            results.append(run(handler))
            # The thread keeps serving: a second attempt runs normally.
            results.append(run(lambda ctx: {"after": True}))
        except BaseException as error:  # pragma: no cover - the failure being tested
            escaped.append(error)

    thread = threading.Thread(target=worker_thread)
    thread.start()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert escaped == []
    failure = failure_of(results[0])
    assert failure.error_type == HANDLER_ABORTED
    assert failure.retryable is False
    assert type(exc).__name__ in failure.message
    assert failure.traceback is not None
    assert results[1].result == {"after": True}


# --- async handlers ----------------------------------------------------------------------------


def test_async_handler_result_and_events() -> None:
    async def handler(ctx: StepContext) -> dict[str, Any]:
        await asyncio.sleep(0)
        ctx.emit("async.ran", {"attempt": ctx.attempt})
        return {"async": True}

    outcome = run(handler)
    assert outcome.result == {"async": True}
    assert outcome.events == (EmittedEvent("async.ran", {"attempt": 2}),)


def test_async_handler_errors_map_like_sync_ones() -> None:
    async def permanent(ctx: StepContext) -> None:
        raise PermanentError("no")

    async def broken(ctx: StepContext) -> None:
        raise ValueError("bad")

    async def too_big(ctx: StepContext) -> dict[str, str]:
        return {"x": "y" * 500}

    assert failure_of(run(permanent)).error_type == "permanent_error"
    failure = failure_of(run(broken))
    assert failure.error_type == HANDLER_ERROR
    assert failure.traceback is not None
    assert failure_of(run(too_big, max_result_bytes=100)).error_type == RESULT_TOO_LARGE


def test_sync_callable_returning_a_coroutine_is_awaited() -> None:
    async def work(ctx: StepContext) -> dict[str, str]:
        await asyncio.sleep(0)
        return {"from": ctx.step_name}

    def handler(ctx: StepContext) -> Any:
        return work(ctx)

    assert run(handler).result == {"from": "step"}


def test_async_handler_is_really_cancelled_from_another_thread() -> None:
    started = threading.Event()
    saw_cancel = threading.Event()
    reached_end = threading.Event()
    cancellation = Cancellation()
    outcomes: list[StepOutcome] = []

    async def handler(ctx: StepContext) -> dict[str, Any]:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            saw_cancel.set()
            raise
        reached_end.set()
        return {"finished": True}

    thread = threading.Thread(
        target=lambda: outcomes.append(run(handler, cancellation=cancellation))
    )
    thread.start()
    try:
        assert started.wait(WAIT_S)
        cancellation.cancel()
    finally:
        thread.join(WAIT_S)
    assert not thread.is_alive(), "the async handler was not cancelled"
    assert saw_cancel.is_set()
    assert not reached_end.is_set()
    failure = failure_of(outcomes[0])
    assert failure.error_type == HANDLER_TIMEOUT
    assert failure.retryable is True


def test_async_handler_cancelled_before_it_awaits_stops_at_its_first_await() -> None:
    cancellation = Cancellation()
    cancellation.cancel()
    after_await = threading.Event()

    async def handler(ctx: StepContext) -> None:
        await asyncio.sleep(30)
        after_await.set()

    outcome = run(handler, cancellation=cancellation)
    assert failure_of(outcome).error_type == HANDLER_TIMEOUT
    assert not after_await.is_set()


def test_cancellation_flag_is_visible_to_a_sync_handler() -> None:
    cancellation = Cancellation()
    started = threading.Event()
    outcomes: list[StepOutcome] = []

    def handler(ctx: StepContext) -> dict[str, bool]:
        started.set()
        # A well-behaved handler checks the flag and stops early.
        return {"cancelled": ctx.cancelled.wait(WAIT_S)}

    thread = threading.Thread(
        target=lambda: outcomes.append(run(handler, cancellation=cancellation))
    )
    thread.start()
    assert started.wait(WAIT_S)
    cancellation.cancel()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert outcomes[0].result == {"cancelled": True}


def test_cancellation_hook_runs_once_and_at_once_when_already_cancelled() -> None:
    cancellation = Cancellation()
    calls: list[str] = []
    cancellation.on_cancel(lambda: calls.append("first"))
    cancellation.cancel()
    cancellation.cancel()
    assert calls == ["first"]
    cancellation.on_cancel(lambda: calls.append("late"))
    assert calls == ["first", "late"]
    assert cancellation.is_set()
    assert bool(cancellation)


# --- deadline ----------------------------------------------------------------------------------


def test_deadline_is_start_plus_timeout() -> None:
    seen: dict[str, Any] = {}

    def handler(ctx: StepContext) -> None:
        seen["deadline"] = ctx.deadline
        seen["remaining"] = ctx.time_remaining()

    outcome = run(handler, timeout_s=90, clock=lambda: T0)
    assert outcome.succeeded
    assert outcome.started_at == T0
    assert seen["deadline"] == T0 + timedelta(seconds=90)
    assert 0 < seen["remaining"] <= 90


def test_time_remaining_is_never_negative() -> None:
    seen: list[float] = []

    def handler(ctx: StepContext) -> None:
        seen.append(ctx.time_remaining())

    run(handler, timeout_s=0)
    run(handler, timeout_s=-5)
    assert seen == [0.0, 0.0]


def test_deadline_is_timezone_aware_utc() -> None:
    seen: list[datetime] = []
    run(lambda ctx: seen.append(ctx.deadline), timeout_s=5)
    assert seen[0].tzinfo is not None
    assert seen[0].utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "value", [{"text": "a\x00b"}, {"a\x00": 1}, ["x", {"deep": "\x00"}], "\x00"]
)
def test_a_nul_character_anywhere_is_an_invalid_result(value: Any) -> None:
    failure = normalise_result(value, 1_000_000)
    assert isinstance(failure, StepFailure)
    assert failure.error_type == "invalid_result"
    assert "NUL" in failure.message


def test_a_literal_backslash_u0000_is_not_mistaken_for_nul() -> None:
    assert normalise_result({"text": "\\u0000"}, 1_000_000) == {"text": "\\u0000"}


def test_a_lone_surrogate_is_an_invalid_result() -> None:
    failure = normalise_result({"path": "caf\udcff"}, 1_000_000)
    assert isinstance(failure, StepFailure)
    assert failure.error_type == "invalid_result"
    assert "Unicode" in failure.message


@pytest.mark.parametrize("retry_after", [float("nan"), float("inf"), -1.0, 1e12])
def test_retry_after_must_be_a_sane_number_of_seconds(retry_after: float) -> None:
    with pytest.raises(ValueError, match="retry_after"):
        RetryableError("later", retry_after=retry_after)


def test_an_emitted_payload_changed_afterwards_is_stored_as_emitted() -> None:
    registry = HandlerRegistry()

    def handler(ctx: StepContext) -> None:
        payload: dict[str, Any] = {"n": 1}
        ctx.emit("thing.happened", payload)
        payload["at"] = object()  # not JSON; must not reach the commit

    registry.register("h", handler)
    outcome = run_attempt(
        ClaimedStep("s", "t", "step", "h", 1, 3, True, None, "w"),
        registry,
        timeout_s=5,
        cancellation=Cancellation(),
        max_result_bytes=1000,
    )
    assert outcome.events == (EmittedEvent("thing.happened", {"n": 1}),)


def test_a_cancellation_wakes_every_waiter_and_stays_set() -> None:
    cancellation = Cancellation()
    assert not cancellation.wait(0.01)  # not cancelled: the timeout ends the wait
    woke: list[bool] = []
    waiters = [
        threading.Thread(target=lambda: woke.append(cancellation.wait(10))) for _ in range(3)
    ]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.05)
    cancellation.cancel()
    for waiter in waiters:
        waiter.join(5)
    assert woke == [True, True, True]
    assert cancellation.is_set()
    assert bool(cancellation)
    assert cancellation.wait(0)  # already set: returns at once


def test_a_cancel_of_a_task_past_its_deadline_keeps_the_deadlines_error_type() -> None:
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    step = ClaimedStep(
        "s", "t", "n", "h", 1, 3, True, None, "w", deadline_at=now - timedelta(seconds=1)
    )
    assert cancel_failure(step, step_only=False, ran=True, now=now).error_type == (
        TASK_DEADLINE_EXCEEDED
    )
    live = replace(step, deadline_at=now + timedelta(seconds=1))
    failure = cancel_failure(live, step_only=True, ran=False, now=now)
    assert (failure.error_type, failure.retryable) == (CANCELLED_ERROR, False)
    assert "of the step" in failure.message
