"""[3] StepExecutor: claims steps atomically in SQL, then hands them to the dispatch channel."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import pykka
from loguru import logger

from app.claims import claim_ready_steps
from app.db import Database
from app.errors import StorageError
from app.messages import ClaimedStep
from app.models import utcnow

if TYPE_CHECKING:
    from actors.dispatcher import DispatcherProxy
    from actors.event_system import EventSystemProxy


class StepExecutor(pykka.ThreadingActor):
    """Claim, tell the Dispatcher (fire-and-forget), report credits, move on."""

    def __init__(
        self,
        db: Database,
        dispatcher: DispatcherProxy,
        *,
        worker_id: str,
        namespaces: Sequence[str],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        super().__init__()
        self._db = db
        self._dispatcher = dispatcher
        self._worker_id = worker_id
        self._namespaces = tuple(namespaces)
        self._clock = clock
        self._intake: EventSystemProxy | None = None
        self.claimed_total = 0

    def connect(self, intake: EventSystemProxy) -> None:
        """Learn where to report claims (the EventSystem is started after this actor)."""
        self._intake = intake

    def execute(self, limit: int) -> None:
        steps: list[ClaimedStep] = []
        try:
            with self._db.write() as conn:
                steps = claim_ready_steps(
                    conn,
                    worker_id=self._worker_id,
                    namespaces=self._namespaces,
                    limit=limit,
                    now=self._clock(),
                )
        except StorageError as exc:
            # Nothing was claimed; the intake tries again shortly.
            logger.warning("claim failed: {}", exc)
            if self._intake is not None:
                self._intake.claim_failed.defer(limit)
            return
        if steps:
            self.claimed_total += len(steps)
            self._dispatcher.dispatch.defer(steps)
        if self._intake is not None:
            self._intake.claimed.defer(limit, len(steps))


StepExecutorProxy = pykka.ActorProxy[StepExecutor]
