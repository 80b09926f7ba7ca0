"""Claiming ready steps for this worker, and handing back claims that could not go on.

Plain code, no threads: the StepExecutor actor owns one ``Claimer`` and sends the claimed
steps on (to the Dispatcher) and the counts back (to the EventSystem).

A claim that fails is most likely a claim that never happened; but a connection lost around
COMMIT may hide one that did commit. So its ``claimed_at`` stamp is remembered, and before
the next claim, once the database answers again, whatever that claim took is handed back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from loguru import logger

from duplex.errors import StorageError
from duplex.messages import ClaimedStep
from duplex.storage.claim_order import DEFAULT_AGING
from duplex.storage.claims import claim_ready_steps
from duplex.storage.concurrency import ClaimHints
from duplex.storage.db import Database
from duplex.storage.releases import release_claims, release_unconfirmed_claim


class Claimer:
    """Claim steps of ``namespaces`` as worker ``worker_id``; hand claims back."""

    def __init__(
        self,
        db: Database,
        *,
        worker_id: str,
        namespaces: Sequence[str],
        clock: Callable[[], datetime],
        aging: timedelta = DEFAULT_AGING,
    ) -> None:
        self._db = db
        self._aging = aging  # worker.priority_aging_ms (docs/time.md, Priority)
        self._worker_id = worker_id
        self._namespaces = tuple(namespaces)
        self._clock = clock
        # ``claimed_at`` stamps of claims that failed: they may have committed unheard.
        self.unconfirmed: list[datetime] = []
        # What the last claim learned: when rate limit tokens come, the waits it caused.
        self.hints = ClaimHints()

    def claim(self, limit: int) -> list[ClaimedStep] | None:
        """Claim up to ``limit`` ready steps; None when the database failed the claim."""
        now = self._clock()
        try:
            self._settle_unconfirmed()
            now = self._clock()  # what was handed back is ready as of now
            hints = ClaimHints()
            with self._db.write() as conn:
                steps = claim_ready_steps(
                    conn,
                    worker_id=self._worker_id,
                    namespaces=self._namespaces,
                    limit=limit,
                    now=now,
                    aging=self._aging,
                    hints=hints,
                )
            self.hints = hints
            return steps
        except StorageError as exc:
            # Most likely nothing was claimed, but a connection lost around COMMIT may hide a
            # claim that did commit: remember it, hand back its steps once the database
            # answers again.
            logger.warning("claim failed: {}", exc)
            self.unconfirmed.append(now)
            return None

    def hand_back(self, steps: Sequence[ClaimedStep], why: str) -> int:
        """Return claimed steps to the queue; return how many could not be (the database
        failed: they fall to the liveness rule)."""
        if not steps:
            return 0
        try:
            with self._db.write() as conn:
                release_claims(
                    conn, steps, worker_id=self._worker_id, now=self._clock(), reason=why
                )
        except StorageError as exc:
            logger.error("could not hand back {} claim(s) ({}): {}", len(steps), why, exc)
            return len(steps)
        return 0

    def _settle_unconfirmed(self) -> None:
        while self.unconfirmed:
            with self._db.write() as conn:
                released = release_unconfirmed_claim(
                    conn,
                    worker_id=self._worker_id,
                    claimed_at=self.unconfirmed[0],
                    now=self._clock(),
                )
            self.unconfirmed.pop(0)
            if released:
                logger.warning(
                    "a claim reported as failed had committed; handed back {} step(s)", released
                )
