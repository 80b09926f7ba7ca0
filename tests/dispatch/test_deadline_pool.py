"""The task deadline in the handler pool: an attempt runs at most until its task's deadline,
and a step whose deadline passed before a slot was free never starts."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from duplex.dispatch.attempt import deadline_failure
from duplex.dispatch.pool import HandlerPool, attempt_limit
from duplex.errors import TASK_DEADLINE_EXCEEDED
from duplex.messages import ClaimedStep

NOW = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)
_ids = itertools.count()


def step(*, timeout_ms: int | None = None, deadline_in_s: float | None = None) -> ClaimedStep:
    n = next(_ids)
    deadline = None if deadline_in_s is None else NOW + timedelta(seconds=deadline_in_s)
    return ClaimedStep(
        step_uuid=f"s{n}",
        task_uuid="t",
        name=f"s{n}",
        handler="h",
        attempt=1,
        max_attempts=3,
        retryable=True,
        timeout_ms=timeout_ms,
        claimed_by="w",
        deadline_at=deadline,
    )


def test_without_a_deadline_the_step_timeout_applies() -> None:
    assert attempt_limit(step(timeout_ms=2000), 30.0, NOW) == (2.0, False)
    assert attempt_limit(step(), 30.0, NOW) == (30.0, False)


def test_a_nearer_deadline_sets_the_limit() -> None:
    assert attempt_limit(step(timeout_ms=2000, deadline_in_s=0.5), 30.0, NOW) == (0.5, True)
    assert attempt_limit(step(deadline_in_s=5), 30.0, NOW) == (5.0, True)
    assert attempt_limit(step(timeout_ms=2000, deadline_in_s=5), 30.0, NOW) == (2.0, False)
    assert attempt_limit(step(deadline_in_s=-1), 30.0, NOW) == (0.0, True)


@given(
    timeout_ms=st.one_of(st.none(), st.integers(min_value=1, max_value=604_800_000)),
    deadline_in_s=st.one_of(st.none(), st.floats(min_value=-1e6, max_value=1e6)),
)
def test_the_limit_is_the_earlier_of_timeout_and_deadline(
    timeout_ms: int | None, deadline_in_s: float | None
) -> None:
    claimed = step(timeout_ms=timeout_ms, deadline_in_s=deadline_in_s)
    limit_s, by_deadline = attempt_limit(claimed, 30.0, NOW)
    timeout_s = timeout_ms / 1000 if timeout_ms else 30.0
    assert 0 <= limit_s <= timeout_s
    if claimed.deadline_at is not None:
        left = (claimed.deadline_at - NOW).total_seconds()
        assert limit_s == pytest.approx(max(0.0, min(left, timeout_s)))
        assert by_deadline == (left < timeout_s)
    else:
        assert (limit_s, by_deadline) == (timeout_s, False)


def test_overdue_steps_are_set_aside_without_taking_a_slot() -> None:
    pool = HandlerPool(1)
    pool.new_worker_id()
    late, fine = step(deadline_in_s=-0.001), step(deadline_in_s=10)
    pool.enqueue([late, fine])
    (run,) = pool.assign(30.0, NOW)
    assert run.step == fine
    assert run.by_deadline
    assert run.timeout_s == 10.0
    assert pool.take_overdue() == [late]
    assert pool.take_overdue() == []


def test_a_deadline_counts_apart_from_timeouts() -> None:
    pool = HandlerPool(2)
    pool.new_worker_id()
    pool.new_worker_id()
    pool.enqueue([step(deadline_in_s=1), step(timeout_ms=100)])
    first, second = pool.assign(30.0, NOW)
    assert pool.time_out(first.worker_id, first.step.step_uuid, 1) is first
    assert pool.time_out(second.worker_id, second.step.step_uuid, 1) is second
    assert (pool.deadlines, pool.timeouts) == (1, 1)


def test_the_deadline_failure_is_final() -> None:
    failure = deadline_failure(NOW, ran=True)
    assert failure.error_type == TASK_DEADLINE_EXCEEDED
    assert failure.retryable is False
    assert NOW.isoformat() in failure.message
