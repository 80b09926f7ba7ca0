"""[1] EventSystem: turns "work is available" into claim commands, never more than fits.

Work is signalled by a poll timer (``polling``), by PostgreSQL LISTEN/NOTIFY
(``event_driven``), or both (``hybrid``); and always by in-process nudges: a submission in
this process, dependents made ready by a commit, a retry falling due. Dependents that a commit
claimed itself are counted here as claims (``claimed_eagerly``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

from loguru import logger

from duplex.actors.command_processor import CommandProcessorProxy
from duplex.actors.proxy import TypedProxy, message
from duplex.actors.supervised import SupervisedActor, tell
from duplex.clock import Timer, TimerHandle
from duplex.intake.credits import IntakeCredits
from duplex.messages import ExecuteReadySteps
from duplex.storage.listen import WorkListener
from duplex.worker.supervision import Supervisor

# How often event-driven intake looks anyway, and how soon a failed claim is retried.
SAFETY_POLL_S = 30.0
CLAIM_RETRY_S = 1.0


class EventSystem(SupervisedActor):
    """Intake: claims when signalled and whenever capacity frees while a backlog remains."""

    def __init__(
        self,
        commands: CommandProcessorProxy,
        timer: Timer,
        *,
        slots: int,
        max_prefetch: int = 0,
        polling_interval_s: float,
        polling: bool = True,
        listen: Callable[[Callable[[], None]], WorkListener] | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        super().__init__(supervisor)
        self._commands = commands
        self._timer = timer
        self._credits = IntakeCredits(slots, max_prefetch)
        self._interval = polling_interval_s
        self._polling = polling
        self._make_listener = listen
        self._listener: WorkListener | None = None
        self._poll_handle: TimerHandle | None = None
        # The look asked for by claims that left steps waiting for tokens (``look_at``).
        self._look_handle: TimerHandle | None = None
        self._look_at = 0.0
        self._self: EventSystemProxy | None = None

    def on_start(self) -> None:
        self._self = EventSystemProxy.of(self.actor_ref)
        if self._make_listener is not None:
            self._listener = self._make_listener(self._self.nudge.defer)

    def begin(self) -> None:
        """Start intake; sent once every actor that reports back to it is wired."""
        if self._listener is not None:
            self._listener.start()
        self.poll()

    def on_stop(self) -> None:
        self._stop_signals()

    def salvage(self) -> None:
        self._credits.stop()
        self._stop_signals()

    def poll(self) -> None:
        """Timer tick: look for work, then schedule the next tick."""
        self._claim(work_signalled=True)
        if not self._credits.stopped and self._self is not None:
            # Event-driven intake still looks now and then: a retry falling due sends no
            # NOTIFY, and the worker that scheduled it may have stopped.
            interval = self._interval if self._polling else max(self._interval, SAFETY_POLL_S)
            self._poll_handle = self._timer.call_later(interval, partial(tell, self._self.poll))

    def nudge(self) -> None:
        """Work may be available now (a submission, dependents made ready, a retry due)."""
        self._claim(work_signalled=True)

    def claimed(self, requested: int, got: int) -> None:
        """The StepExecutor finished a claim."""
        self._credits.claimed(requested, got)
        self._claim(work_signalled=False)

    def claimed_eagerly(self, steps: int) -> None:
        """A commit claimed ``steps`` dependents for this worker (they hold credits too)."""
        self._credits.claimed_eagerly(steps)

    def look_at(self, delay_s: float) -> None:
        """Steps wait for rate limit tokens that come in ``delay_s``: claim then. One look is
        kept, the earliest (each claim that touches a limit asks again for the next)."""
        if self._self is None or self._credits.stopped:
            return
        now = time.monotonic()
        pending = self._look_handle is not None and now < self._look_at
        if pending and self._look_at <= now + delay_s:
            return
        if pending and self._look_handle is not None:
            self._look_handle.cancel()
        self._look_at = now + delay_s
        self._look_handle = self._timer.call_later(delay_s, partial(tell, self._self.nudge))

    def claim_failed(self, requested: int) -> None:
        """The StepExecutor's claim failed (database trouble): try again after a pause."""
        self._credits.claimed(requested, 0)
        self._credits.backlog_likely = True
        if self._self is not None and not self._credits.stopped:
            self._timer.call_later(CLAIM_RETRY_S, partial(tell, self._self.nudge))

    def capacity_freed(self, slots: int = 1, prefetch: int | None = None) -> None:
        """The Dispatcher has room again; ``prefetch`` is the size of its window now."""
        if prefetch is not None:
            self._credits.resize(prefetch)
        self._credits.freed(slots)
        self._claim(work_signalled=False)

    def commits_lagging(self, lagging: bool) -> None:
        """The CompletionProcessor holds too many uncommitted results (or caught up again)."""
        self._credits.commits_lagging = lagging
        if lagging:
            logger.info("commits are lagging; intake paused")
        else:
            self._claim(work_signalled=False)

    def stats(self) -> dict[str, int]:
        """Free credits of the capacity: all of it when idle, unless credits went missing;
        ``excess``: credits given back that were never taken (0 unless accounting is wrong)."""
        credits = self._credits
        return {"capacity": credits.capacity, "free": credits.available, "excess": credits.excess}

    def listener_settled(self) -> bool:
        """Whether the listener took its first look (its nudge is in this mailbox, or was
        handled): what tests wait for before they make the moment they need. True when there
        is no listener, or one that does not say."""
        first_look = getattr(self._listener, "first_look", None)
        return first_look is None or bool(first_look.is_set())

    def stop_intake(self) -> None:
        """Claim nothing more (the worker is stopping)."""
        self._credits.stop()
        self._stop_signals()
        logger.info("intake stopped")

    def _stop_signals(self) -> None:
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        if self._look_handle is not None and time.monotonic() < self._look_at:
            self._look_handle.cancel()
        if self._listener is not None:
            self._listener.stop()

    def _claim(self, *, work_signalled: bool) -> None:
        limit = self._credits.next_claim(work_signalled=work_signalled)
        if limit:
            tell(self._commands.handle, ExecuteReadySteps(limit))


class EventSystemProxy(TypedProxy[EventSystem]):
    """The EventSystem's messages; it is the intake the other actors report back to."""

    begin = message(EventSystem.begin)
    poll = message(EventSystem.poll)
    nudge = message(EventSystem.nudge)
    claimed = message(EventSystem.claimed)
    claimed_eagerly = message(EventSystem.claimed_eagerly)
    claim_failed = message(EventSystem.claim_failed)
    look_at = message(EventSystem.look_at)
    capacity_freed = message(EventSystem.capacity_freed)
    commits_lagging = message(EventSystem.commits_lagging)
    stats = message(EventSystem.stats)
    listener_settled = message(EventSystem.listener_settled)
    stop_intake = message(EventSystem.stop_intake)
