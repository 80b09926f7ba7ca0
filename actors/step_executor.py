"""[3] StepExecutor: claims steps atomically in SQL, then hands them to the dispatch channel."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from pykka.typing import proxy_field

from duplex.actors.dispatcher import DispatcherProxy
from duplex.actors.ports import ClaimReports
from duplex.actors.proxy import TypedProxy, message
from duplex.actors.supervised import SupervisedActor, tell
from duplex.clock import utcnow
from duplex.intake.claimer import Claimer
from duplex.messages import ClaimedStep
from duplex.observability.metrics import WorkerMetrics
from duplex.storage.claim_order import DEFAULT_AGING
from duplex.storage.db import Database
from duplex.worker.supervision import Supervisor


class StepExecutor(SupervisedActor):
    """Claim, tell the Dispatcher (fire-and-forget), report credits, move on.

    Claims it could not hand on (the Dispatcher is gone, or this actor failed between the
    claim and the hand-off) are handed back in SQL at once, so none is stranded.
    """

    def __init__(
        self,
        db: Database,
        dispatcher: DispatcherProxy,
        *,
        worker_id: str,
        namespaces: Sequence[str],
        clock: Callable[[], datetime] = utcnow,
        supervisor: Supervisor | None = None,
        metrics: WorkerMetrics | None = None,
        priority_aging: timedelta = DEFAULT_AGING,
    ) -> None:
        super().__init__(supervisor)
        self._metrics = metrics
        self._dispatcher = dispatcher
        self._clock = clock
        self._claimer = Claimer(
            db, worker_id=worker_id, namespaces=namespaces, clock=clock, aging=priority_aging
        )
        self._intake: ClaimReports | None = None
        self._in_hand: list[ClaimedStep] = []
        self.claimed_total = 0

    def connect(self, intake: ClaimReports) -> None:
        """Learn where to report claims (the EventSystem is started after this actor)."""
        self._intake = intake

    def execute(self, limit: int) -> None:
        steps = self._claimer.claim(limit)
        if steps is None:  # the database failed: the intake tries again shortly
            if self._intake is not None:
                tell(self._intake.claim_failed, limit)
            return
        if steps:
            self._in_hand = steps
            self.claimed_total += len(steps)
            if self._metrics is not None:
                for step in steps:
                    self._metrics.claimed.inc((step.namespace,))
            if not tell(self._dispatcher.dispatch, steps):
                self._hand_back("the dispatcher is gone")
            self._in_hand = []
        if self._metrics is not None:
            for kind_and_name, count in self._claimer.hints.waits.items():
                self._metrics.flow_waits.inc(kind_and_name, count)
        if self._intake is not None:
            tell(self._intake.claimed, limit, len(steps))
            tokens_at = self._claimer.hints.tokens_at
            if tokens_at is not None:  # candidates wait for rate limit tokens: look then
                tell(self._intake.look_at, max(0.0, (tokens_at - self._clock()).total_seconds()))

    def salvage(self) -> None:
        self._hand_back("the step executor failed")

    def _hand_back(self, why: str) -> None:
        steps, self._in_hand = self._in_hand, []
        lost = self._claimer.hand_back(steps, why)
        if lost:
            self.supervisor.results_lost(lost)


class StepExecutorProxy(TypedProxy[StepExecutor]):
    """The StepExecutor's messages."""

    connect = message(StepExecutor.connect)
    execute = message(StepExecutor.execute)
    claimed_total = proxy_field(0)
