"""[1] EventSystem: turns "work is available" into claim commands, never more than fits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pykka
from loguru import logger

from app.intake import IntakeCredits
from app.messages import ExecuteReadySteps
from app.timer import Timer, TimerHandle

if TYPE_CHECKING:
    from actors.command_processor import CommandProcessorProxy


class EventSystem(pykka.ThreadingActor):
    """Intake: polls on a timer, and claims at once when nudged or when capacity frees."""

    def __init__(
        self,
        commands: CommandProcessorProxy,
        timer: Timer,
        *,
        capacity: int,
        polling_interval_s: float,
    ) -> None:
        super().__init__()
        self._commands = commands
        self._timer = timer
        self._credits = IntakeCredits(capacity)
        self._interval = polling_interval_s
        self._poll_handle: TimerHandle | None = None
        self._self: EventSystemProxy | None = None

    def on_start(self) -> None:
        self._self = self.actor_ref.proxy()

    def begin(self) -> None:
        """Start polling; sent once every actor that reports back to intake is wired."""
        self.poll()

    def on_stop(self) -> None:
        if self._poll_handle is not None:
            self._poll_handle.cancel()

    def poll(self) -> None:
        """Timer tick: look for work, then schedule the next tick."""
        self._claim(work_signalled=True)
        if not self._credits.stopped and self._self is not None:
            self._poll_handle = self._timer.call_later(self._interval, self._self.poll.defer)

    def nudge(self) -> None:
        """Work may be available now (a submission, dependents made ready, a retry due)."""
        self._claim(work_signalled=True)

    def claimed(self, requested: int, got: int) -> None:
        """The StepExecutor finished a claim."""
        self._credits.claimed(requested, got)
        self._claim(work_signalled=False)

    def capacity_freed(self, slots: int = 1) -> None:
        """The Dispatcher has room again."""
        self._credits.freed(slots)
        self._claim(work_signalled=False)

    def stop_intake(self) -> None:
        """Claim nothing more (the worker is stopping)."""
        self._credits.stop()
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        logger.info("intake stopped")

    def _claim(self, *, work_signalled: bool) -> None:
        limit = self._credits.next_claim(work_signalled=work_signalled)
        if limit:
            self._commands.handle.defer(ExecuteReadySteps(limit))


EventSystemProxy = pykka.ActorProxy[EventSystem]
