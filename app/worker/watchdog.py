"""The worker's row and its two background threads: the heartbeat and the watchdog.

``Heartbeat`` keeps the worker's ``workers`` row: registered at start, beaten at a fixed rate,
marked stopped at the end. It needs no actor, so a saturated worker still beats. The
``Watchdog`` notices a failed actor (and has the worker stop in order), samples the load for
the saturation warnings, has lost workers' claims recovered, and collects the actors' stats
that the heartbeat writes. Both are plain objects driven by a ``run`` loop; each round is a
method of its own, so tests can drive them without threads.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pykka
from loguru import logger

from duplex.clock import utcnow
from duplex.errors import StorageError
from duplex.observability.metrics import WorkerMetrics
from duplex.observability.saturation import SaturationMonitor, sample_of
from duplex.storage.db import Database
from duplex.storage.workers import mark_worker_stopped, record_heartbeat, register_worker
from duplex.worker.supervision import ActorFailure, Supervisor

# How often the watchdog looks at the actors.
WATCH_TICK_S = 0.05
# How long a failed actor's own report of why may take after pykka marked it stopped.
FAILURE_REPORT_GRACE_S = 1.0


def new_worker_id() -> str:
    """Return an id unique across hosts and restarts: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Heartbeat:
    """Say in the ``workers`` row that this worker lives, with its last stats.

    ``stats`` is what the watchdog last collected from the actors; when they do not answer,
    the beats go on with the last stats.
    """

    # Set before the first registration's write: whether the row may exist, so that a stop
    # (or a signal) that lands between its COMMIT and the end of ``register`` still marks it.
    row_may_exist = False

    def __init__(
        self,
        db: Database,
        worker_id: str,
        metrics: WorkerMetrics,
        *,
        interval_s: float,
        claim_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.worker_id = worker_id
        self.metrics = metrics
        self.interval_s = interval_s
        self.claim_timeout_s = claim_timeout_s
        self.stats: dict[str, Any] = {}
        self._clock = clock
        self._last = clock()

    def register(self) -> None:
        """Record this worker as starting (its host and pid: for same-host recovery)."""
        self.row_may_exist = True
        with self.db.write() as conn:
            register_worker(
                conn, self.worker_id, hostname=socket.gethostname(), pid=os.getpid(), now=utcnow()
            )

    def mark_stopped(self, stats: dict[str, Any]) -> None:
        """Record the stop, with the final stats; a failure is logged, not raised."""
        if not self.row_may_exist:  # marking a row that was never written changes nothing
            return
        try:
            with self.db.write() as conn:
                mark_worker_stopped(conn, self.worker_id, now=utcnow(), stats=stats)
        except StorageError as exc:
            logger.warning("could not mark worker stopped: {}", exc)

    def age_s(self) -> float:
        """Seconds since the last successful beat (or since this heartbeat was made)."""
        return self._clock() - self._last

    def run(self, closing: threading.Event) -> None:
        """Beat until ``closing`` is set."""
        next_beat = self._clock() + self.interval_s
        # A fixed rate: the time a write takes (the GIL is busy under load) is not added on.
        while not closing.wait(max(0.0, next_beat - self._clock())):
            self.beat()
            next_beat = max(next_beat + self.interval_s, self._clock())

    def beat(self) -> bool:
        """Write one beat; return whether it was written."""
        silent_s = self.age_s()
        if silent_s > self.claim_timeout_s:
            # A pause (SIGSTOP, swap, a stalled disk) longer than the liveness timeout: other
            # workers may have recovered this worker's running attempts, whose late results
            # the commit guard now rejects. New work is served as usual.
            logger.warning(
                "this worker was silent for {:.1f}s, longer than event_system.claim_timeout_s "
                "({:g}s): it was presumed dead and its running steps may have been recovered",
                silent_s,
                self.claim_timeout_s,
            )
        slots = self.metrics.slots()
        if slots is not None and slots.abandoned_threads:
            logger.warning("{} abandoned handler thread(s) still running", slots.abandoned_threads)
        try:
            with self.db.write() as conn:
                record_heartbeat(conn, self.worker_id, now=utcnow(), stats=dict(self.stats))
        except StorageError as exc:
            logger.warning("heartbeat failed: {}", exc)
            return False
        self._last = self._clock()
        return True


def dead_actors(refs: Sequence[pykka.ActorRef[Any]]) -> list[str]:
    """The class names of the actors among ``refs`` that are no longer alive."""
    return [ref.actor_class.__name__ for ref in refs if not ref.is_alive()]


def failure_of(
    supervisor: Supervisor, dead: list[str], *, grace_s: float = FAILURE_REPORT_GRACE_S
) -> ActorFailure:
    """What killed the actors found dead, as their own report says when there is one."""
    # pykka marks an actor stopped a moment before it runs ``on_failure``, which reports
    # why: wait for that report rather than call the failure unexplained.
    if dead and not supervisor.failed.is_set():
        supervisor.failed.wait(grace_s)
    return supervisor.first_failure() or ActorFailure(", ".join(dead), "it stopped unexpectedly")


class Watchdog:
    """Watch the actors of one worker, every ``tick_s``, until the worker stops.

    The worker gives it what to look at and what to do, as callables: ``refs`` (the actors),
    ``running`` (whether the actors are up), ``crash`` (stop in order after a failure),
    ``recover`` (have lost workers' claims recovered) and ``collect_stats`` (ask the actors
    for their stats; may raise ``pykka.Timeout`` or ``pykka.ActorDeadError``); ``sweep``, if
    given, has the tasks past their deadline expired every ``sweep_every_s``.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        heartbeat: Heartbeat,
        saturation: SaturationMonitor,
        *,
        refs: Callable[[], Sequence[pykka.ActorRef[Any]]],
        running: Callable[[], bool],
        stopping: Callable[[], bool],
        crash: Callable[[list[str]], None],
        recover: Callable[[], object],
        collect_stats: Callable[[], dict[str, Any]],
        tick_s: float = WATCH_TICK_S,
        clock: Callable[[], float] = time.monotonic,
        sweep: Callable[[], object] | None = None,
        sweep_every_s: float = 1.0,
    ) -> None:
        self.supervisor = supervisor
        self.heartbeat = heartbeat
        self.saturation = saturation
        self._refs = refs
        self._running = running
        self._stopping = stopping
        self._crash = crash
        self._recover = recover
        self._collect_stats = collect_stats
        self._tick_s = tick_s
        self._clock = clock
        self._recovery_every_s = min(1.0, heartbeat.claim_timeout_s / 3)
        self._next_recovery = clock() + self._recovery_every_s
        self._next_stats = clock()
        self._sweep = sweep
        self._sweep_every_s = sweep_every_s
        self._next_sweep = clock() + sweep_every_s

    def run(self, closing: threading.Event) -> None:
        """Watch until ``closing`` is set, the worker stops, or an actor failed."""
        while not closing.is_set() and not self._stopping():
            self.supervisor.failed.wait(self._tick_s)
            if not self.round():
                return

    def round(self) -> bool:
        """One look at the actors; return whether to go on watching."""
        if self._stopping():
            return False
        dead = dead_actors(self._refs())
        if self.supervisor.failed.is_set() or dead:
            self._crash(dead)
            return False
        if not self._running():  # stopped meanwhile
            return False
        self.watch_saturation()
        now = self._clock()
        if now >= self._next_recovery:
            self._recover()
            self._next_recovery = now + self._recovery_every_s
        if self._sweep is not None and now >= self._next_sweep:
            self._sweep()
            self._next_sweep = now + self._sweep_every_s
        if now >= self._next_stats:
            # On no answer, the heartbeat goes on with the last stats.
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                self.heartbeat.stats = self._collect_stats()
            self._next_stats = now + self.heartbeat.interval_s
        return True

    def watch_saturation(self) -> None:
        """Sample the load from the worker's figures; log the interval's warnings."""
        metrics = self.heartbeat.metrics
        sample = sample_of(
            metrics,
            heartbeat_age_s=self.heartbeat.age_s(),
            heartbeat_interval_s=self.heartbeat.interval_s,
        )
        if sample is None:
            return
        self.saturation.observe(sample)
        for line in self.saturation.report(self._clock(), metrics.ready_steps):
            logger.warning(line)
