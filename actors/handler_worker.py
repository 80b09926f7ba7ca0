"""[4b] HandlerWorker: runs one handler at a time on its own thread."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pykka

from app.execution import run_attempt
from app.handlers import Cancellation, HandlerRegistry
from app.messages import ClaimedStep

if TYPE_CHECKING:
    from actors.completion_processor import CompletionProcessorProxy
    from actors.dispatcher import DispatcherProxy


class HandlerWorker(pykka.ThreadingActor):
    """A pool slot. Frees its slot first, then sends the result on the completion channel."""

    # A handler stuck past its timeout keeps this thread; it must not keep the process alive.
    use_daemon_thread = True

    def __init__(
        self,
        worker_id: int,
        dispatcher: DispatcherProxy,
        completion: CompletionProcessorProxy,
        registry: HandlerRegistry,
        *,
        max_result_bytes: int,
    ) -> None:
        super().__init__()
        self._worker_id = worker_id
        self._dispatcher = dispatcher
        self._completion = completion
        self._registry = registry
        self._max_result_bytes = max_result_bytes

    def run(self, step: ClaimedStep, cancellation: Cancellation, timeout_s: float) -> None:
        outcome = run_attempt(
            step,
            self._registry,
            timeout_s=timeout_s,
            cancellation=cancellation,
            max_result_bytes=self._max_result_bytes,
        )
        # Slot first: a slow completion path must never stop new handlers from starting.
        self._dispatcher.slot_freed.defer(self._worker_id, step.step_uuid, step.attempt)
        self._completion.submit.defer(outcome)


HandlerWorkerProxy = pykka.ActorProxy[HandlerWorker]
