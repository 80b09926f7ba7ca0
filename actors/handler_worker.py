"""[4b] HandlerWorker: runs one handler at a time on its own thread."""

from __future__ import annotations

from types import TracebackType

import pykka
from loguru import logger

from duplex.actors.completion_processor import CompletionProcessorProxy
from duplex.actors.ports import SlotReports
from duplex.actors.proxy import TypedProxy, message
from duplex.actors.supervised import tell
from duplex.clock import utcnow
from duplex.dispatch.attempt import run_attempt, storable_text
from duplex.errors import HANDLER_ABORTED
from duplex.handlers import Cancellation, HandlerRegistry, StepStore
from duplex.messages import ClaimedStep, StepFailure, StepOutcome
from duplex.observability.logs import step_log
from duplex.observability.tracing import StepTracer
from duplex.worker.supervision import Supervisor


class HandlerWorker(pykka.ThreadingActor):
    """A pool slot. Frees its slot first, then sends the result on the completion channel.

    Its failure policy is a restart: the Dispatcher is told and replaces it (see there).
    """

    # A handler stuck past its timeout keeps this thread; it must not keep the process alive.
    use_daemon_thread = True

    def __init__(
        self,
        worker_id: int,
        dispatcher: SlotReports,
        completion: CompletionProcessorProxy,
        registry: HandlerRegistry,
        *,
        max_result_bytes: int,
        max_batch_items: int = 100_000,
        store: StepStore | None = None,
        supervisor: Supervisor | None = None,
        tracer: StepTracer | None = None,
    ) -> None:
        super().__init__()
        # Where ``ctx.checkpoint`` saves and ``ctx.batch_results`` reads (one for the worker:
        # it holds no state of its own, only the database).
        self._store = store
        self._max_batch_items = max_batch_items
        self._tracer = tracer
        self._supervisor = supervisor or Supervisor()
        self._worker_id = worker_id
        self._dispatcher = dispatcher
        self._completion = completion
        self._registry = registry
        self._max_result_bytes = max_result_bytes

    def run(self, step: ClaimedStep, cancellation: Cancellation, timeout_s: float) -> None:
        if self._tracer is None:
            outcome = self._attempt(step, cancellation, timeout_s)
        else:
            with self._tracer.attempt(step, cancellation) as record:
                outcome = self._attempt(step, cancellation, timeout_s)
                record(outcome)
        # Slot first: a slow completion path must never stop new handlers from starting.
        tell(self._dispatcher.slot_freed, self._worker_id, step.step_uuid, step.attempt)
        if not tell(self._completion.submit, outcome):
            # The CompletionProcessor died; the worker is stopping and this claim falls to
            # the liveness rule (recovered as worker_lost once this process has exited).
            step_log(step).error(
                "result of step {} lost: the completion path is gone", step.step_uuid
            )
            self._supervisor.results_lost(1)

    def _attempt(
        self, step: ClaimedStep, cancellation: Cancellation, timeout_s: float
    ) -> StepOutcome:
        try:
            outcome = run_attempt(
                step,
                self._registry,
                timeout_s=timeout_s,
                cancellation=cancellation,
                max_result_bytes=self._max_result_bytes,
                max_batch_items=self._max_batch_items,
                store=self._store,
            )
        except BaseException as exc:
            # run_attempt turns every handler failure into a result; this is Duplex failing to
            # prepare the attempt. The slot and the claim must still come back.
            step_log(step).exception("could not run step {}", step.step_uuid)
            now = utcnow()
            failure = StepFailure(
                HANDLER_ABORTED,
                storable_text(f"the attempt could not be run: {type(exc).__name__}: {exc}"),
                retryable=False,
            )
            outcome = StepOutcome(step, now, now, failure=failure)
        return outcome

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        logger.error(
            "actor HandlerWorker {} failed ({}: {}); restarting it",
            self._worker_id,
            exception_type.__name__ if exception_type else "error",
            exception_value,
        )
        if not tell(self._dispatcher.worker_failed, self._worker_id):
            self._supervisor.actor_failed(f"HandlerWorker {self._worker_id}", exception_value)


class HandlerWorkerProxy(TypedProxy[HandlerWorker]):
    """A HandlerWorker's messages."""

    run = message(HandlerWorker.run)
