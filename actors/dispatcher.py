"""[4] Dispatcher: the dispatch channel, and the pool of HandlerWorkers that bounds parallelism."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pykka
from loguru import logger
from pykka.typing import proxy_field

from duplex.actors.completion_processor import CompletionProcessorProxy
from duplex.actors.handler_worker import HandlerWorker, HandlerWorkerProxy
from duplex.actors.ports import CapacityReports
from duplex.actors.proxy import TypedProxy, message
from duplex.actors.supervised import SupervisedActor, take_mailbox, tell
from duplex.clock import Timer, TimerHandle, utcnow
from duplex.dispatch.attempt import cancel_failure, deadline_failure, timeout_failure
from duplex.dispatch.credits import SlotCredits
from duplex.dispatch.pool import HandlerPool, Running
from duplex.errors import HANDLER_WORKER_FAILED, SHUTDOWN_TIMEOUT
from duplex.handlers import HandlerRegistry, StepStore
from duplex.messages import ClaimedStep, StepFailure, StepOutcome
from duplex.observability.logs import step_log
from duplex.observability.tracing import StepTracer
from duplex.storage.cancels import RunningCancel
from duplex.worker.supervision import Supervisor

# How long an idle HandlerWorker may take to stop when the Dispatcher stops.
IDLE_STOP_S = 5.0


class Dispatcher(SupervisedActor):
    """Give each claimed step to an idle worker; enforce timeouts; replace stuck workers.

    A HandlerWorker that dies is restarted: its only state is the attempt it ran, which this
    actor holds, so that attempt is settled as ``handler_worker_failed`` and a fresh worker
    takes the slot (a late result from it would be rejected by the commit guard).
    """

    def __init__(
        self,
        completion: CompletionProcessorProxy,
        registry: HandlerRegistry,
        timer: Timer,
        *,
        pool: HandlerPool,
        default_timeout_s: float,
        max_result_bytes: int,
        max_batch_items: int = 100_000,
        store: StepStore | None = None,
        clock: Callable[[], datetime] = utcnow,
        prefetch: int = 0,
        supervisor: Supervisor | None = None,
        tracer: StepTracer | None = None,
    ) -> None:
        super().__init__(supervisor)
        self._credits = SlotCredits.for_pool(pool.size, prefetch)
        self._tracer = tracer
        self._completion = completion
        self._registry = registry
        self._timer = timer
        # Given by the worker, which reads it in place for its figures (no message).
        self._pool = pool
        self._default_timeout_s = default_timeout_s
        self._max_result_bytes = max_result_bytes
        # Handed to every HandlerWorker it starts, replacements included.
        self._max_batch_items = max_batch_items
        self._store = store
        self._clock = clock
        self._workers: dict[int, HandlerWorkerProxy] = {}
        self._deadlines: dict[int, TimerHandle] = {}
        self._intake: CapacityReports | None = None
        self._self: DispatcherProxy | None = None
        self._draining = False
        self.dispatched = 0

    def on_start(self) -> None:
        self._self = DispatcherProxy.of(self.actor_ref)
        for _ in range(self._pool.size):
            self._start_worker()

    def on_stop(self) -> None:
        for handle in self._deadlines.values():
            handle.cancel()
        for worker_id, worker in self._workers.items():
            if worker_id in self._pool.abandoned:
                continue
            if worker_id in self._pool.running:
                # Inside a handler: it stops when the handler returns (a thread cannot be
                # interrupted), and the worker's stop waits for its result elsewhere.
                worker.actor_ref.stop(block=False)
                continue
            # An idle worker stops at once: wait for it, so a stopped Dispatcher leaves no
            # handler actor behind (a start that failed half-way must leave nothing running).
            try:
                worker.actor_ref.stop(block=True, timeout=IDLE_STOP_S)
            except pykka.Timeout:
                logger.error("handler worker {} did not stop in time", worker_id)

    def connect(self, intake: CapacityReports) -> None:
        """Learn where to report freed capacity (the EventSystem is started after this actor)."""
        self._intake = intake

    def salvage(self) -> None:
        # Claims that never started go back to the queue; running handlers carry on and send
        # their results straight to the CompletionProcessor, and the stop waits for them.
        for handle in self._deadlines.values():
            handle.cancel()
        waiting = self._pool.take_waiting()
        for call in take_mailbox(self):  # claims that were on their way here
            if call.attr_path == ("dispatch",):
                waiting.extend(call.args[0])
        self._release(waiting)
        self.supervisor.adopt(self.live_workers())

    def dispatch(self, steps: list[ClaimedStep]) -> None:
        """The dispatch channel: accept claimed steps, fire-and-forget."""
        if self._draining:
            self._release(steps)
            return
        self._pool.enqueue(steps)
        self._assign()

    def slot_freed(self, worker_id: int, step_uuid: str, attempt: int) -> None:
        """A worker finished an attempt (its result is on its way to the CompletionProcessor)."""
        if not self._pool.finished(worker_id, step_uuid, attempt):
            # A worker abandoned after a timeout came back; its slot was replaced already.
            logger.bind(step_uuid=step_uuid, attempt=attempt).info(
                "abandoned handler thread for step {} returned", step_uuid
            )
            self._retire(worker_id)
            return
        handle = self._deadlines.pop(worker_id, None)
        if handle is not None:
            handle.cancel()
        self._credits.ended(worker_id, time.monotonic())
        self._assign()
        self._capacity_freed(batched=True)

    def worker_failed(self, worker_id: int) -> None:
        """A HandlerWorker died outside any handler: settle its attempt, start a fresh one."""
        run = self._pool.running.get(worker_id)
        self._workers.pop(worker_id, None)
        if run is None:
            self._pool.retire(worker_id)
        else:
            self._pool.abandon(worker_id, run.step.step_uuid, run.step.attempt)
            self._pool.retire(worker_id)
            handle = self._deadlines.pop(worker_id, None)
            if handle is not None:
                handle.cancel()
            failure = StepFailure(
                HANDLER_WORKER_FAILED,
                "the worker actor running this attempt failed; it was restarted",
                retryable=True,
            )
            self._abandon(run, failure)
            self._capacity_freed()
        logger.warning("handler worker {} failed; a fresh one takes its slot", worker_id)
        self._start_worker()
        self._assign()

    def deadline_passed(self, worker_id: int, step_uuid: str, attempt: int) -> None:
        """Timer: if the attempt still runs, fail it as timed out and replace the worker."""
        run = self._pool.time_out(worker_id, step_uuid, attempt)
        if run is None:  # a stale deadline: that attempt finished in time
            return
        self._deadlines.pop(worker_id, None)
        if run.by_deadline:
            # The task's deadline, not the step's timeout: the same cancellation, not retried.
            self._abandon(run, deadline_failure(run.step.deadline_at, ran=True))
            step_log(run.step).warning(
                "step {} ({}) cancelled at its task's deadline; worker replaced, "
                "{} abandoned thread(s)",
                run.step.name,
                step_uuid,
                len(self._pool.abandoned),
            )
        else:
            self._abandon(run, timeout_failure(run.timeout_s))
            step_log(run.step).warning(
                "step {} ({}) timed out after {:g}s; worker replaced, {} abandoned thread(s)",
                run.step.name,
                step_uuid,
                run.timeout_s,
                len(self._pool.abandoned),
            )
        self._start_worker()
        self._capacity_freed()
        self._assign()

    def cancel_attempts(self, requests: list[RunningCancel]) -> int:
        """An operator cancelled these attempts (their task, or their step): cancel those this
        pool still holds as a task deadline does, committed as ``cancelled``; return how many.

        A running one is abandoned at once, with no grace: its failure goes to the commit
        first, then ``ctx.cancelled`` is set, so whatever the handler returns after it heard
        is rejected by the commit guard, never recorded as complete.
        """
        cancelled = 0
        for request in requests:
            held = self._pool.cancel(request.step_uuid, request.attempt)
            if held is None:  # it ended meanwhile: its own result is on its way
                continue
            cancelled += 1
            now = self._clock()
            if isinstance(held, Running):
                handle = self._deadlines.pop(held.worker_id, None)
                if handle is not None:
                    handle.cancel()
                failure = cancel_failure(held.step, step_only=request.step_only, ran=True, now=now)
                self._abandon(held, failure)
                step_log(held.step).warning(
                    "step {} ({}) cancelled by operator while it ran; worker replaced, "
                    "{} abandoned thread(s)",
                    held.step.name,
                    held.step.step_uuid,
                    len(self._pool.abandoned),
                )
                self._start_worker()
            else:
                failure = cancel_failure(held, step_only=request.step_only, ran=False, now=now)
                if not tell(self._completion.submit, StepOutcome(held, now, now, failure=failure)):
                    self.supervisor.results_lost(1)
            self._capacity_freed()
        if cancelled:
            self._assign()
        return cancelled

    def drain(self) -> int:
        """Stop starting handlers; hand back claimed steps that never started."""
        self._draining = True
        waiting = self._pool.take_waiting()
        self._release(waiting)
        return len(waiting)

    def abandon_running(self) -> int:
        """Shutdown timeout: give every running attempt a ``shutdown_timeout`` result."""
        runs = list(self._pool.running.values())
        for run in runs:
            self._pool.abandon(run.worker_id, run.step.step_uuid, run.step.attempt)
            failure = StepFailure(
                SHUTDOWN_TIMEOUT,
                "the worker stopped before the handler finished (worker.shutdown_timeout_ms)",
                retryable=True,
            )
            self._abandon(run, failure)
        return len(runs)

    def _release(self, steps: list[ClaimedStep]) -> None:
        """Hand claims that never started back to the queue (through the commit path)."""
        if steps and not tell(self._completion.release, steps):
            # The CompletionProcessor is gone: they fall to the liveness rule.
            self.supervisor.results_lost(len(steps))

    def live_workers(self) -> list[pykka.ActorRef[HandlerWorker]]:
        """Return the workers that are not stuck in an abandoned handler."""
        return [
            proxy.actor_ref
            for worker_id, proxy in self._workers.items()
            if worker_id not in self._pool.abandoned
        ]

    def stats(self) -> dict[str, Any]:
        return {
            "running": self._pool.busy,
            "waiting": len(self._pool.waiting),
            "idle": len(self._pool.idle),
            "abandoned_threads": len(self._pool.abandoned),
            "timeouts": self._pool.timeouts,
            "deadlines": self._pool.deadlines,
            "cancels": self._pool.cancels,
            "dispatched": self.dispatched,
            "prefetch_window": self._credits.window.size,
            "draining": self._draining,
        }

    def _assign(self) -> None:
        if self._draining:
            return
        now = time.monotonic()
        runs = self._pool.assign(self._default_timeout_s, self._clock())
        self._expire_overdue()
        for run in runs:
            self.dispatched += 1
            self._credits.assigned(run.worker_id, now)
            tell(self._workers[run.worker_id].run, run.step, run.cancellation, run.timeout_s)
            self._deadlines[run.worker_id] = self._timer.call_later(
                run.timeout_s, self._deadline_callback(run)
            )

    def _expire_overdue(self) -> None:
        """Fail the claimed steps whose task's deadline passed before a slot was free: they
        never start, and their credits go back at once."""
        for step in self._pool.take_overdue():
            now = self._clock()
            outcome = StepOutcome(
                step, now, now, failure=deadline_failure(step.deadline_at, ran=False)
            )
            if not tell(self._completion.submit, outcome):
                self.supervisor.results_lost(1)
            self._capacity_freed()

    def _deadline_callback(self, run: Running) -> Callable[[], None]:
        me, worker_id, step = self._self, run.worker_id, run.step
        assert me is not None

        def fire() -> None:
            tell(me.deadline_passed, worker_id, step.step_uuid, step.attempt)

        return fire

    def _abandon(self, run: Running, failure: StepFailure) -> None:
        # The thread cannot be killed: send the failure now, then flag it (async handlers are
        # cancelled for real; the handler's own cancel hook runs on a thread of its own), and
        # let the commit guard reject whatever it returns later.
        # A timeout says how slow these handlers can be.
        ran_s = self._credits.ended(run.worker_id, time.monotonic())
        now = self._clock()
        # The attempt started when its handler did, not now (``workflow_steps.started_at``).
        started = now - timedelta(seconds=ran_s)
        if not tell(self._completion.submit, StepOutcome(run.step, started, now, failure=failure)):
            self.supervisor.results_lost(1)
        run.cancellation.cancel()
        worker = self._workers.get(run.worker_id)
        if worker is not None:
            worker.actor_ref.stop(block=False)

    def _retire(self, worker_id: int) -> None:
        self._workers.pop(worker_id, None)

    def _start_worker(self) -> None:
        assert self._self is not None
        worker_id = self._pool.new_worker_id()
        ref = HandlerWorker.start(
            worker_id,
            self._self,
            self._completion,
            self._registry,
            max_result_bytes=self._max_result_bytes,
            max_batch_items=self._max_batch_items,
            store=self._store,
            supervisor=self.supervisor,
            tracer=self._tracer,
        )
        self._workers[worker_id] = HandlerWorkerProxy.of(ref)

    def _capacity_freed(self, *, batched: bool = False) -> None:
        """A slot's credit is free: give the intake back what is free so far (``SlotCredits``)."""
        credits = self._credits.freed(batched=batched, waiting=bool(self._pool.waiting))
        if credits and self._intake is not None:
            tell(self._intake.capacity_freed, credits, self._credits.window.size)


class DispatcherProxy(TypedProxy[Dispatcher]):
    """The Dispatcher's messages."""

    connect = message(Dispatcher.connect)
    dispatch = message(Dispatcher.dispatch)
    slot_freed = message(Dispatcher.slot_freed)
    worker_failed = message(Dispatcher.worker_failed)
    deadline_passed = message(Dispatcher.deadline_passed)
    cancel_attempts = message(Dispatcher.cancel_attempts)
    drain = message(Dispatcher.drain)
    abandon_running = message(Dispatcher.abandon_running)
    live_workers = message(Dispatcher.live_workers)
    stats = message(Dispatcher.stats)
    dispatched = proxy_field(0)
