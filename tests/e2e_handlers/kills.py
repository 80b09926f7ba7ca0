"""Handlers and a subscriber for the PostgreSQL fault tests (``tests/e2e/test_postgres_faults.py``).

They run inside ``duplex run`` subprocesses. Each handler appends ``<step_uuid> <attempt>
<pid>`` to the file named by ``$KILLS_RUN_LOG`` as it starts, so a test can tell which
process ran which attempt, and how often.

While the file ``$KILLS_HOLD`` exists and holds a number K, every ``kills.sleep`` that starts
once the run log has K lines or more (the Kth start of any worker, and every later one)
appends its line to ``$KILLS_HELD_LOG`` too and waits until the file is gone: the test makes
running attempts that cannot end, at a point of the run it chose, for as long as it needs.

The subscriber checks, on a connection of its own (``$KILLS_EVENTS_DB``, a libpq URL), that
each delivered event's ``domain_events`` row is committed; it appends every checked event id
to ``$KILLS_EVENTS_CHECKED`` and every event whose row it could not see to
``$KILLS_EVENTS_MISSING``.

``$KILLS_BREAK`` (comma-separated) patches a known breakage into the worker at import, so
that a test can be shown to fail when the guarantee it checks is broken:

* ``own_claims``: lost-claim recovery also takes the worker's own running attempts.
* ``no_pid_rule``: the same-host "process is gone" rule is off (only the heartbeat counts).
* ``no_guard``: the commit guard is gone: a late result is applied like any other.
* ``heartbeat_asks_handlers``: the heartbeat first asks every handler actor something, so
  it stalls while handlers are busy.
* ``announce_before_commit``: a batch's events are published inside its transaction.
* ``listen_gives_up``: the LISTEN thread ends when its connection is lost.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg

from duplex import DomainEvent, StepContext, step_handler, subscribe

RUN_LOG_ENV = "KILLS_RUN_LOG"
EVENTS_DB_ENV = "KILLS_EVENTS_DB"
EVENTS_CHECKED_ENV = "KILLS_EVENTS_CHECKED"
EVENTS_MISSING_ENV = "KILLS_EVENTS_MISSING"
BREAK_ENV = "KILLS_BREAK"
HOLD_ENV = "KILLS_HOLD"
HELD_LOG_ENV = "KILLS_HELD_LOG"
# A hold never lasts longer than this, so a test that forgot one cannot hang.
HOLD_LIMIT_S = 60.0


def _append(path: str, line: str) -> None:
    # One write() on an O_APPEND file: lines from several processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def _record_start(ctx: StepContext) -> None:
    path = os.environ.get(RUN_LOG_ENV)
    if path:
        _append(path, f"{ctx.step_uuid} {ctx.attempt} {os.getpid()}")


def _hold(ctx: StepContext) -> None:
    hold, held_log = os.environ.get(HOLD_ENV), os.environ.get(HELD_LOG_ENV)
    run_log = os.environ.get(RUN_LOG_ENV)
    if not hold or not held_log or not run_log or not os.path.exists(hold):
        return
    with open(hold) as armed, open(run_log) as log:
        from_start = int(armed.read().strip() or 1)
        if sum(1 for _ in log) < from_start:
            return
    _append(held_log, f"{ctx.step_uuid} {ctx.attempt} {os.getpid()}")
    deadline = time.monotonic() + HOLD_LIMIT_S
    while os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.02)


@step_handler("kills.sleep")
def sleep(ctx: StepContext) -> dict[str, Any]:
    """Sleep ``inputs.ms`` milliseconds (not cancellable: a stopped process wakes up late);
    first wait while ``$KILLS_HOLD`` exists."""
    _record_start(ctx)
    _hold(ctx)
    ms = int(ctx.inputs.get("ms", 200))
    time.sleep(ms / 1000)
    return {"slept_ms": ms, "pid": os.getpid()}


@step_handler("kills.burn")
def burn(ctx: StepContext) -> dict[str, Any]:
    """Burn CPU in pure Python for ``inputs.ms`` milliseconds, holding the GIL all along."""
    _record_start(ctx)
    end = time.monotonic() + int(ctx.inputs.get("ms", 2000)) / 1000
    rounds = 0
    total = 0
    while time.monotonic() < end:
        for i in range(2000):
            total += i * i
        rounds += 1
    return {"rounds": rounds, "pid": os.getpid()}


_checker_lock = threading.Lock()
_checker: psycopg.Connection[Any] | None = None


def _event_row_exists(conninfo: str, event_id: str) -> bool:
    global _checker
    with _checker_lock:
        for attempt in range(2):
            try:
                if _checker is None or _checker.closed:
                    _checker = psycopg.connect(conninfo, autocommit=True)
                row = _checker.execute(
                    "SELECT 1 FROM domain_events WHERE event_id = %s", (event_id,)
                ).fetchone()
                return row is not None
            except psycopg.OperationalError:
                _checker = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


@subscribe("*")
def check_committed(event: DomainEvent) -> None:
    """Record whether the delivered event's row is committed (seen by another connection)."""
    conninfo = os.environ.get(EVENTS_DB_ENV)
    checked = os.environ.get(EVENTS_CHECKED_ENV)
    missing = os.environ.get(EVENTS_MISSING_ENV)
    if not conninfo or not checked or not missing:
        return
    if not _event_row_exists(conninfo, event.event_id):
        _append(missing, f"{event.event_id} {event.name} {event.step_uuid}")
    _append(checked, event.event_id)


# --- breakages, for showing that the tests catch them --------------------------------------


def _patch(owner: object, name: str, value: object) -> None:
    assert hasattr(owner, name), f"nothing to patch: {owner!r}.{name}"
    setattr(owner, name, value)


def _break_own_claims() -> None:
    import duplex.commit.committer as cp

    # Both the read that decides whether to recover and the recovery itself.
    for name in ("has_lost_claims", "recover_lost_claims"):
        original = vars(cp)[name]

        def including_mine(
            conn: Any, *, me: str, dead_workers: Any = (), _original: Any = original, **kw: Any
        ) -> Any:
            return _original(conn, me="(nobody)", dead_workers=[*dead_workers, me], **kw)

        _patch(cp, name, including_mine)


def _break_pid_rule() -> None:
    import duplex.commit.committer as cp

    def nobody_is_gone(conn: Any, **kw: Any) -> list[str]:
        return []

    _patch(cp, "dead_local_workers", nobody_is_gone)


class _AnyClaim:
    """Compares equal to any (attempt, claimant): the guard's check always passes."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False


class _AnyClaims(dict[str, Any]):
    def pop(self, key: str, default: Any = None) -> Any:
        return _AnyClaim()

    def get(self, key: str, default: Any = None) -> Any:
        return _AnyClaim()

    def __delitem__(self, key: str) -> None:
        pass


def _break_guard() -> None:
    from sqlalchemy import bindparam, or_, update

    import duplex.storage.results as commits
    from duplex.storage.driver import BulkStatement

    ws = commits.ws
    read = commits._lock_tasks_and_read_claims

    def claims_held(conn: Any, outcomes: Any) -> Any:
        task_states, _ = read(conn, outcomes)
        return task_states, _AnyClaims()

    _patch(commits, "_lock_tasks_and_read_claims", claims_held)
    guarded = commits._APPLY_OUTCOME
    # The same parameters, none of them guarding anything.
    unguarded = (
        update(ws)
        .where(
            ws.c.step_uuid == bindparam("b_step_uuid"),
            or_(ws.c.attempts == bindparam("b_attempt"), ws.c.step_uuid.is_not(None)),
            or_(ws.c.claimed_by == bindparam("b_claimed_by"), ws.c.step_uuid.is_not(None)),
        )
        .values(
            state=bindparam("v_state"),
            results=bindparam("v_results", type_=ws.c.results.type),
            error=bindparam("v_error", type_=ws.c.error.type),
            next_attempt_at=bindparam("v_next_attempt_at", type_=ws.c.next_attempt_at.type),
            started_at=bindparam("v_started_at", type_=ws.c.started_at.type),
            completed_at=bindparam("v_completed_at", type_=ws.c.completed_at.type),
            updated_at=bindparam("v_updated_at", type_=ws.c.updated_at.type),
        )
    )
    _patch(commits, "_APPLY_OUTCOME", BulkStatement(unguarded, guarded.columns))


def _break_heartbeat() -> None:
    import pykka

    from duplex.actors.handler_worker import HandlerWorker
    from duplex.worker.watchdog import Heartbeat

    original = Heartbeat.beat

    def heartbeat_after_asking(self: Heartbeat) -> bool:
        # Each handler actor answers only between two handlers: a busy one holds us up.
        for ref in pykka.ActorRegistry.get_by_class(HandlerWorker):
            ref.proxy().use_daemon_thread.get(timeout=60)
        return original(self)

    _patch(Heartbeat, "beat", heartbeat_after_asking)


def _break_announce() -> None:
    from duplex.actors.completion_processor import CompletionProcessor
    from duplex.commit.committer import Committer
    from duplex.storage.releases import release_claims
    from duplex.storage.results import commit_outcomes

    original_init = CompletionProcessor.__init__

    def init_handing_the_publisher_down(self: CompletionProcessor, *a: Any, **kw: Any) -> None:
        original_init(self, *a, **kw)
        self._committer.publisher = self._publisher  # type: ignore[attr-defined]

    def commit_announcing_early(
        self: Committer, outcomes: Any, releases: Any = (), **_: Any
    ) -> Any:
        now = self._clock()
        with self._db.write() as conn:
            report = commit_outcomes(conn, outcomes, policy=self._policy, now=now, rng=self._rng)
            if report.events:
                self.publisher.publish(report.events).get(timeout=10)  # type: ignore[attr-defined]
            released = release_claims(
                conn, releases, worker_id=self._worker_id, now=now, reason="released on stop"
            )
        return report, released

    _patch(CompletionProcessor, "__init__", init_handing_the_publisher_down)
    _patch(Committer, "_commit", commit_announcing_early)


def _break_listen() -> None:
    from duplex.storage import listen

    def run_once(self: listen.ChannelListener) -> None:
        try:
            with psycopg.connect(self._conninfo, autocommit=True) as conn:
                conn.execute(f"LISTEN {self._channel}")
                self._signal(self._on_connect)
                while not self._stop.is_set():
                    for note in conn.notifies(timeout=0.5):
                        self._signal(self._on_notify, note.payload)
        except psycopg.Error:
            return

    _patch(listen.ChannelListener, "_run", run_once)


_BREAKAGES = {
    "own_claims": _break_own_claims,
    "no_pid_rule": _break_pid_rule,
    "no_guard": _break_guard,
    "heartbeat_asks_handlers": _break_heartbeat,
    "announce_before_commit": _break_announce,
    "listen_gives_up": _break_listen,
}

for _name in filter(None, (n.strip() for n in os.environ.get(BREAK_ENV, "").split(","))):
    _BREAKAGES[_name]()
