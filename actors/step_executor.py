"""[3] StepExecutor: claims steps atomically in SQL, then hands them to the dispatch channel."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from loguru import logger
from pykka.typing import proxy_field

from duplex.actors.dispatcher import DispatcherProxy
from duplex.actors.ports import ClaimReports
from duplex.actors.proxy import TypedProxy, message
from duplex.actors.supervised import SupervisedActor, tell
from duplex.clock import utcnow
from duplex.errors import StorageError
from duplex.messages import ClaimedStep
from duplex.observability.metrics import WorkerMetrics
from duplex.storage.claims import claim_ready_steps, release_claims, release_unconfirmed_claim
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
    ) -> None:
        super().__init__(supervisor)
        self._metrics = metrics
        self._db = db
        self._dispatcher = dispatcher
        self._worker_id = worker_id
        self._namespaces = tuple(namespaces)
        self._clock = clock
        self._intake: ClaimReports | None = None
        self._in_hand: list[ClaimedStep] = []
        # ``claimed_at`` stamps of claims that failed: they may have committed unheard.
        self._unconfirmed: list[datetime] = []
        self.claimed_total = 0

    def connect(self, intake: ClaimReports) -> None:
        """Learn where to report claims (the EventSystem is started after this actor)."""
        self._intake = intake

    def execute(self, limit: int) -> None:
        steps: list[ClaimedStep] = []
        now = self._clock()
        try:
            self._settle_unconfirmed()
            now = self._clock()  # what was handed back is ready as of now
            with self._db.write() as conn:
                steps = claim_ready_steps(
                    conn,
                    worker_id=self._worker_id,
                    namespaces=self._namespaces,
                    limit=limit,
                    now=now,
                )
        except StorageError as exc:
            # Most likely nothing was claimed, but a connection lost around COMMIT may hide a
            # claim that did commit: remember it, hand back its steps once the database
            # answers again. The intake tries again shortly.
            logger.warning("claim failed: {}", exc)
            self._unconfirmed.append(now)
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
        if self._intake is not None:
            tell(self._intake.claimed, limit, len(steps))

    def _settle_unconfirmed(self) -> None:
        while self._unconfirmed:
            with self._db.write() as conn:
                released = release_unconfirmed_claim(
                    conn,
                    worker_id=self._worker_id,
                    claimed_at=self._unconfirmed[0],
                    now=self._clock(),
                )
            self._unconfirmed.pop(0)
            if released:
                logger.warning(
                    "a claim reported as failed had committed; handed back {} step(s)", released
                )

    def salvage(self) -> None:
        self._hand_back("the step executor failed")

    def _hand_back(self, why: str) -> None:
        steps, self._in_hand = self._in_hand, []
        if not steps:
            return
        try:
            with self._db.write() as conn:
                release_claims(
                    conn, steps, worker_id=self._worker_id, now=self._clock(), reason=why
                )
        except StorageError as exc:
            logger.error("could not hand back {} claim(s) ({}): {}", len(steps), why, exc)
            self.supervisor.results_lost(len(steps))


class StepExecutorProxy(TypedProxy[StepExecutor]):
    """The StepExecutor's messages."""

    connect = message(StepExecutor.connect)
    execute = message(StepExecutor.execute)
    claimed_total = proxy_field(0)
