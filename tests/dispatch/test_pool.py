"""HandlerPool: the pool size is the concurrency limit; abandoned workers cannot free slots."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from duplex.dispatch.pool import HandlerPool
from duplex.messages import ClaimedStep

_counter = itertools.count()


def make_step(timeout_ms: int | None = None, attempt: int = 1) -> ClaimedStep:
    n = next(_counter)
    return ClaimedStep(
        step_uuid=f"step-{n}",
        task_uuid="task",
        name=f"s{n}",
        handler="t.h",
        attempt=attempt,
        max_attempts=3,
        retryable=True,
        timeout_ms=timeout_ms,
        claimed_by="w",
    )


def filled_pool(size: int) -> HandlerPool:
    pool = HandlerPool(size)
    for _ in range(size):
        pool.new_worker_id()
    return pool


def test_new_worker_ids_are_distinct_and_idle() -> None:
    pool = filled_pool(3)
    assert list(pool.idle) == [0, 1, 2]
    assert pool.new_worker_id() == 3


def test_assign_pairs_waiting_steps_with_idle_workers_in_order() -> None:
    pool = filled_pool(2)
    steps = [make_step() for _ in range(3)]
    pool.enqueue(steps)
    runs = pool.assign(default_timeout_s=30)
    assert [(r.worker_id, r.step) for r in runs] == [(0, steps[0]), (1, steps[1])]
    assert pool.busy == 2
    assert list(pool.waiting) == [steps[2]]
    assert pool.assign(default_timeout_s=30) == []


def test_assign_uses_the_step_timeout_or_the_default() -> None:
    pool = filled_pool(2)
    pool.enqueue([make_step(timeout_ms=1500), make_step()])
    runs = pool.assign(default_timeout_s=30)
    assert [r.timeout_s for r in runs] == [1.5, 30]
    assert all(not r.cancellation.is_set() for r in runs)
    assert runs[0].cancellation is not runs[1].cancellation


def test_finished_frees_the_slot_for_the_next_step() -> None:
    pool = filled_pool(1)
    first, second = make_step(), make_step()
    pool.enqueue([first, second])
    (run,) = pool.assign(30)
    assert pool.finished(run.worker_id, first.step_uuid, first.attempt)
    (run2,) = pool.assign(30)
    assert run2.step == second
    assert run2.worker_id == run.worker_id


def test_finished_for_another_attempt_is_stale() -> None:
    pool = filled_pool(1)
    step = make_step(attempt=2)
    pool.enqueue([step])
    (run,) = pool.assign(30)
    assert not pool.finished(run.worker_id, step.step_uuid, 1)
    assert not pool.finished(run.worker_id, "other-step", 2)
    assert not pool.finished(99, step.step_uuid, 2)
    assert pool.busy == 1
    assert pool.finished(run.worker_id, step.step_uuid, 2)
    assert pool.busy == 0


def test_time_out_abandons_the_worker_and_its_late_finish_is_ignored() -> None:
    pool = filled_pool(1)
    step, next_step = make_step(), make_step()
    pool.enqueue([step, next_step])
    (run,) = pool.assign(30)
    timed_out = pool.time_out(run.worker_id, step.step_uuid, step.attempt)
    assert timed_out is run
    assert pool.timeouts == 1
    assert pool.busy == 0
    assert run.worker_id in pool.abandoned
    # The dispatcher replaces the stuck worker; capacity is not lost.
    replacement = pool.new_worker_id()
    (run2,) = pool.assign(30)
    assert run2.worker_id == replacement
    assert run2.step == next_step
    # The stuck thread finally returns: ignored, and it never becomes idle again.
    assert not pool.finished(run.worker_id, step.step_uuid, step.attempt)
    assert run.worker_id not in pool.idle
    assert run.worker_id not in pool.abandoned
    assert pool.busy == 1


def test_time_out_after_the_step_finished_is_ignored() -> None:
    pool = filled_pool(1)
    step, later = make_step(), make_step()
    pool.enqueue([step, later])
    (run,) = pool.assign(30)
    assert pool.finished(run.worker_id, step.step_uuid, step.attempt)
    pool.assign(30)  # the same worker now runs ``later``
    assert pool.time_out(run.worker_id, step.step_uuid, step.attempt) is None
    assert pool.timeouts == 0
    assert pool.running[run.worker_id].step == later


def test_take_waiting_returns_steps_that_never_started() -> None:
    pool = filled_pool(1)
    steps = [make_step() for _ in range(3)]
    pool.enqueue(steps)
    pool.assign(30)
    assert pool.take_waiting() == steps[1:]
    assert not pool.waiting
    assert pool.busy == 1


class PoolMachine(RuleBasedStateMachine):
    """The dispatcher's decisions, in any order the actors' messages may arrive."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = HandlerPool(1)
        self.size = 1
        self.attempts = itertools.count(1)
        # Attempts stuck in abandoned workers: (worker_id, step_uuid, attempt).
        self.stuck: list[tuple[int, str, int]] = []
        self.started: list[str] = []
        self.finished_steps: list[str] = []
        self.ignored_late = 0

    @initialize(size=st.integers(min_value=1, max_value=6))
    def start(self, size: int) -> None:
        self.pool = filled_pool(size)
        self.size = size

    @rule(n=st.integers(min_value=1, max_value=5))
    def steps_arrive(self, n: int) -> None:
        self.pool.enqueue(make_step(attempt=next(self.attempts)) for _ in range(n))

    @rule()
    def assign(self) -> None:
        idle_before = len(self.pool.idle)
        waiting_before = len(self.pool.waiting)
        runs = self.pool.assign(default_timeout_s=30)
        assert len(runs) == min(idle_before, waiting_before)
        self.started.extend(r.step.step_uuid for r in runs)

    @precondition(lambda self: self.pool.running)
    @rule(data=st.data())
    def handler_finishes(self, data: st.DataObject) -> None:
        worker_id = data.draw(st.sampled_from(sorted(self.pool.running)))
        step = self.pool.running[worker_id].step
        assert self.pool.finished(worker_id, step.step_uuid, step.attempt)
        self.finished_steps.append(step.step_uuid)

    @precondition(lambda self: self.pool.running)
    @rule(data=st.data())
    def handler_times_out(self, data: st.DataObject) -> None:
        worker_id = data.draw(st.sampled_from(sorted(self.pool.running)))
        step = self.pool.running[worker_id].step
        run = self.pool.time_out(worker_id, step.step_uuid, step.attempt)
        assert run is not None
        assert run.step == step
        self.stuck.append((worker_id, step.step_uuid, step.attempt))
        self.pool.new_worker_id()  # the dispatcher starts a replacement

    @precondition(lambda self: self.stuck)
    @rule(data=st.data())
    def stuck_handler_returns_late(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(min_value=0, max_value=len(self.stuck) - 1))
        worker_id, step_uuid, attempt = self.stuck.pop(index)
        busy = self.pool.busy
        idle = list(self.pool.idle)
        assert not self.pool.finished(worker_id, step_uuid, attempt)
        # Ignored: no slot freed, nothing becomes idle, and a repeat is ignored too.
        assert self.pool.busy == busy
        assert list(self.pool.idle) == idle
        assert not self.pool.finished(worker_id, step_uuid, attempt)
        self.ignored_late += 1

    @precondition(lambda self: self.pool.running)
    @rule(data=st.data())
    def stale_messages_change_nothing(self, data: st.DataObject) -> None:
        worker_id = data.draw(st.sampled_from(sorted(self.pool.running)))
        step = self.pool.running[worker_id].step
        running = dict(self.pool.running)
        assert not self.pool.finished(worker_id, step.step_uuid, step.attempt + 1000)
        assert self.pool.time_out(worker_id, "no-such-step", step.attempt) is None
        assert self.pool.running == running

    @rule()
    def stop_intake(self) -> None:
        self.pool.take_waiting()
        assert not self.pool.waiting

    @invariant()
    def never_more_running_than_size(self) -> None:
        assert self.pool.busy <= self.size

    @invariant()
    def every_live_worker_is_idle_or_running(self) -> None:
        idle = set(self.pool.idle)
        running = set(self.pool.running)
        assert len(idle) == len(self.pool.idle), "a worker is idle twice"
        assert not idle & running
        assert len(idle) + len(running) == self.size
        assert not self.pool.abandoned & (idle | running)

    @invariant()
    def abandoned_are_exactly_the_stuck_ones(self) -> None:
        assert self.pool.abandoned == {w for w, _, _ in self.stuck}

    @invariant()
    def no_step_starts_twice(self) -> None:
        assert len(self.started) == len(set(self.started))
        assert len(self.finished_steps) == len(set(self.finished_steps))


PoolMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_handler_pool_machine = PoolMachine.TestCase


def test_cancel_abandons_the_running_attempt_or_drops_a_waiting_one() -> None:
    pool = filled_pool(1)
    running, waiting = make_step(), make_step()
    pool.enqueue([running, waiting])
    (run,) = pool.assign(default_timeout_s=30)

    assert pool.cancel(waiting.step_uuid, waiting.attempt) == waiting
    assert list(pool.waiting) == []
    assert pool.cancel(running.step_uuid, running.attempt + 1) is None  # another attempt
    assert pool.cancel(running.step_uuid, running.attempt) == run
    # Its worker is abandoned: a late finish frees no slot, and nothing is held any more.
    assert pool.finished(run.worker_id, running.step_uuid, running.attempt) is False
    assert pool.busy == 0
    assert pool.cancel(running.step_uuid, running.attempt) is None
    assert pool.cancels == 2
