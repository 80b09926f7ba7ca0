"""The handler pool's bookkeeping: which worker runs what, what waits, what was abandoned.

Plain state, no threads: the Dispatcher actor owns one ``HandlerPool`` and turns its
decisions into messages. The pool size is the concurrency limit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from duplex.handlers import Cancellation
from duplex.messages import ClaimedStep


@dataclass
class Running:
    """An attempt a worker is running."""

    worker_id: int
    step: ClaimedStep
    cancellation: Cancellation
    timeout_s: float
    # The limit is the task's deadline (``max_duration``), not the step's timeout: when it
    # passes, the attempt ends as ``task_deadline_exceeded``, not retried.
    by_deadline: bool = False


def attempt_limit(
    step: ClaimedStep, default_timeout_s: float, now: datetime | None
) -> tuple[float, bool]:
    """Return how long the attempt may run from ``now``, and whether the task's deadline (not
    the step's timeout) sets that limit."""
    timeout_s = step.timeout_ms / 1000 if step.timeout_ms else default_timeout_s
    if step.deadline_at is None or now is None:
        return timeout_s, False
    left_s = (step.deadline_at - now).total_seconds()
    if left_s < timeout_s:
        return max(0.0, left_s), True
    return timeout_s, False


@dataclass
class HandlerPool:
    """Slots of a fixed-size pool: idle workers, running attempts and waiting steps."""

    size: int
    idle: deque[int] = field(default_factory=deque)
    running: dict[int, Running] = field(default_factory=dict)
    waiting: deque[ClaimedStep] = field(default_factory=deque)
    # Workers replaced after a timeout whose thread is still stuck in a handler.
    abandoned: set[int] = field(default_factory=set)
    timeouts: int = 0
    # Attempts cancelled at their task's deadline, and claimed steps whose deadline passed
    # before they could start (never run; ``take_overdue``).
    deadlines: int = 0
    overdue: list[ClaimedStep] = field(default_factory=list)
    # Attempts cancelled by an operator (``duplex cancel``), running or waiting for a slot.
    cancels: int = 0
    _next_id: int = 0

    def new_worker_id(self) -> int:
        """Reserve an id for a fresh worker and count it idle."""
        worker_id = self._next_id
        self._next_id += 1
        self.idle.append(worker_id)
        return worker_id

    def enqueue(self, steps: Iterable[ClaimedStep]) -> None:
        self.waiting.extend(steps)

    def assign(self, default_timeout_s: float, now: datetime | None = None) -> list[Running]:
        """Pair waiting steps with idle workers; return the new assignments.

        With ``now``, a step whose task's deadline has passed is not started but set aside
        (``take_overdue``), and a running attempt is limited to what is left of it.
        """
        started = []
        while self.waiting and self.idle:
            step = self.waiting.popleft()
            timeout_s, by_deadline = attempt_limit(step, default_timeout_s, now)
            if by_deadline and timeout_s <= 0:
                self.overdue.append(step)
                continue
            worker_id = self.idle.popleft()
            run = Running(worker_id, step, Cancellation(), timeout_s, by_deadline)
            self.running[worker_id] = run
            started.append(run)
        return started

    def finished(self, worker_id: int, step_uuid: str, attempt: int) -> bool:
        """Free the worker's slot; return False when the message is stale (abandoned worker)."""
        if worker_id in self.abandoned:
            self.abandoned.discard(worker_id)
            return False
        run = self.running.get(worker_id)
        if run is None or run.step.step_uuid != step_uuid or run.step.attempt != attempt:
            return False
        del self.running[worker_id]
        self.idle.append(worker_id)
        return True

    def time_out(self, worker_id: int, step_uuid: str, attempt: int) -> Running | None:
        """Abandon the worker if it still runs that attempt (a timeout); return the attempt."""
        run = self.abandon(worker_id, step_uuid, attempt)
        if run is not None:
            if run.by_deadline:
                self.deadlines += 1
            else:
                self.timeouts += 1
        return run

    def cancel(self, step_uuid: str, attempt: int) -> Running | ClaimedStep | None:
        """Take that attempt away: abandon the worker running it (returned as ``Running``), or
        remove it from the steps waiting for a slot (returned as the ``ClaimedStep``); None
        when this pool does not hold it (it ended; its result is on its way)."""
        for worker_id, run in self.running.items():
            if run.step.step_uuid == step_uuid and run.step.attempt == attempt:
                self.abandon(worker_id, step_uuid, attempt)
                self.cancels += 1
                return run
        for step in self.waiting:
            if step.step_uuid == step_uuid and step.attempt == attempt:
                self.waiting.remove(step)
                self.cancels += 1
                return step
        return None

    def take_overdue(self) -> list[ClaimedStep]:
        """Remove and return the claimed steps whose task's deadline passed before they ran."""
        steps, self.overdue = self.overdue, []
        return steps

    def abandon(self, worker_id: int, step_uuid: str, attempt: int) -> Running | None:
        """Give up on the worker if it still runs that attempt; return the attempt if so."""
        run = self.running.get(worker_id)
        if run is None or run.step.step_uuid != step_uuid or run.step.attempt != attempt:
            return None
        del self.running[worker_id]
        self.abandoned.add(worker_id)
        return run

    def retire(self, worker_id: int) -> None:
        """Forget a worker that died: it is neither idle nor stuck in a handler."""
        self.abandoned.discard(worker_id)
        if worker_id in self.idle:
            self.idle.remove(worker_id)

    def take_waiting(self) -> list[ClaimedStep]:
        """Remove and return the steps that never started."""
        steps = list(self.waiting)
        self.waiting.clear()
        return steps

    @property
    def busy(self) -> int:
        return len(self.running)
