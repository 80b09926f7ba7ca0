"""Fault injection for the end-to-end fault tests (``tests/e2e/test_faults_e2e.py``).

The worker imports this module through ``worker.handler_modules``; everything here happens at
import time, inside the ``duplex run`` subprocess, and is driven by environment variables:

``E2E_RUN_LOG`` / ``E2E_DONE_LOG``
    The handler ``faults.work`` appends ``<step_uuid> <attempt>`` to the first as it starts
    and to the second as it returns, so a test can count how often each attempt really ran.
    With ``inputs.gate`` it waits, after its start, until that file exists (``gates.py``).
``E2E_HOLD_AT = "N"`` / ``E2E_HOLD_GATE``
    The Nth ``faults.work`` started in this process waits, after its start, until the file
    ``E2E_HOLD_GATE`` exists: that attempt is sure to be running until the test says.
``E2E_FAULT = "Class.method:N"``
    The Nth call of that actor method raises ``RuntimeError("injected fault")`` before the
    method does anything. The methods are reached by fire-and-forget messages, so the
    exception kills the actor (an exception in an ask would go back to the caller).
    ``CommandProcessor.handle`` counts ``ExecuteReadySteps`` commands only.
    ``StepExecutor.hand_off`` is a point inside ``StepExecutor.execute``: the Nth claim that
    got steps raises right after its transaction committed, with the claims in hand, before
    they are told to the Dispatcher.
    When the fault fires, a line ``<fault> <epoch seconds> [<step_uuid> <attempt>]`` goes to
    ``E2E_FAULT_LOG``.
``E2E_BREAK = "name,name"``
    Deliberate breakages of Duplex itself, to prove that the tests notice a broken guarantee
    (see ``BREAKAGES``). Never set in a normal run.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from duplex import StepContext, step_handler
from tests.e2e_handlers.gates import wait_at_gate

RUN_LOG_ENV = "E2E_RUN_LOG"
DONE_LOG_ENV = "E2E_DONE_LOG"
FAULT_ENV = "E2E_FAULT"
FAULT_LOG_ENV = "E2E_FAULT_LOG"
BREAK_ENV = "E2E_BREAK"
HOLD_AT_ENV = "E2E_HOLD_AT"
HOLD_GATE_ENV = "E2E_HOLD_GATE"

_log_lock = threading.Lock()


def _append(env: str, line: str) -> None:
    path = os.environ.get(env)
    if not path:
        return
    with _log_lock, open(path, "a", encoding="utf-8") as log:
        log.write(line + "\n")
        log.flush()


_starts = 0


@step_handler("faults.work")
def work(ctx: StepContext) -> dict[str, Any]:
    """Log the start, sleep ``inputs.seconds`` (default 0.03), log the end; wait at a gate
    first when told to (``inputs.gate``, or ``E2E_HOLD_AT``)."""
    global _starts
    _append(RUN_LOG_ENV, f"{ctx.step_uuid} {ctx.attempt}")
    with _log_lock:
        _starts += 1
        held = str(_starts) == os.environ.get(HOLD_AT_ENV)
    if held:
        wait_at_gate(ctx, os.environ[HOLD_GATE_ENV])
    if "gate" in ctx.inputs:
        wait_at_gate(ctx, str(ctx.inputs["gate"]))
    seconds = float(ctx.inputs.get("seconds", 0.03))
    ctx.cancelled.wait(seconds)
    _append(DONE_LOG_ENV, f"{ctx.step_uuid} {ctx.attempt}")
    return {"step": ctx.step_name, "attempt": ctx.attempt}


# --- injected faults ------------------------------------------------------------------------


class _Countdown:
    """Fires once, on the Nth call counted (thread-safe: HandlerWorkers run in parallel)."""

    def __init__(self, spec: str, nth: int) -> None:
        self.spec = spec
        self.nth = nth
        self.calls = 0
        self._lock = threading.Lock()

    def hit(self) -> bool:
        with self._lock:
            self.calls += 1
            return self.calls == self.nth

    def fire(self, detail: str = "") -> None:
        _append(FAULT_LOG_ENV, f"{self.spec} {time.time():.6f} {detail}".strip())
        raise RuntimeError("injected fault")


def _actor_classes() -> dict[str, type[Any]]:
    from duplex.actors.command_processor import CommandProcessor
    from duplex.actors.completion_processor import CompletionProcessor
    from duplex.actors.dispatcher import Dispatcher
    from duplex.actors.event_publisher import DomainEventPublisher
    from duplex.actors.event_system import EventSystem
    from duplex.actors.handler_worker import HandlerWorker
    from duplex.actors.step_executor import StepExecutor

    classes: list[type[Any]] = [
        EventSystem,
        CommandProcessor,
        StepExecutor,
        Dispatcher,
        CompletionProcessor,
        DomainEventPublisher,
        HandlerWorker,
    ]
    return {cls.__name__: cls for cls in classes}


def _wrap_method(cls: type[Any], method: str, countdown: _Countdown) -> None:
    original: Callable[..., Any] = getattr(cls, method)
    if not callable(original):
        raise ValueError(f"{FAULT_ENV}: {cls.__name__}.{method} is not a method")

    @functools.wraps(original)
    def faulty(self: Any, *args: Any, **kwargs: Any) -> Any:
        if method == "handle":
            from duplex.messages import ExecuteReadySteps

            counted = bool(args) and isinstance(args[0], ExecuteReadySteps)
        else:
            counted = True
        if counted and countdown.hit():
            step: Any = args[0] if args else None
            detail = (
                f"{step.step_uuid} {step.attempt}"
                if hasattr(step, "step_uuid") and hasattr(step, "attempt")
                else ""
            )
            countdown.fire(detail)
        return original(self, *args, **kwargs)

    setattr(cls, method, faulty)


def _fault_at_hand_off(countdown: _Countdown) -> None:
    import duplex.actors.step_executor as step_executor

    original_tell = getattr(step_executor, "tell")  # noqa: B009

    def tell(method: Any, *args: Any) -> bool:
        if getattr(method, "_attr_path", None) == ("dispatch",) and countdown.hit():
            countdown.fire(" ".join(f"{s.step_uuid} {s.attempt}" for s in args[0]))
        return bool(original_tell(method, *args))

    setattr(step_executor, "tell", tell)  # noqa: B010


def install_fault(spec: str) -> None:
    """Arm ``Class.method:N`` (see the module docstring)."""
    target, _, nth_text = spec.partition(":")
    cls_name, _, method = target.partition(".")
    nth = int(nth_text or "1")
    countdown = _Countdown(target, nth)
    if target == "StepExecutor.hand_off":
        _fault_at_hand_off(countdown)
        return
    classes = _actor_classes()
    if cls_name not in classes:
        raise ValueError(f"{FAULT_ENV}: unknown actor {cls_name!r} (one of {sorted(classes)})")
    _wrap_method(classes[cls_name], method, countdown)


# --- deliberate breakages (to prove the tests catch them) -------------------------------------


def _break_crash_ignored() -> None:
    """The watchdog notices the failed actor but does nothing: the worker stays half alive."""
    from duplex.worker.wiring import Worker

    Worker._crash = lambda self, dead: None  # type: ignore[method-assign]


def _break_crash_exit_zero() -> None:
    """The worker stops in order after an actor failed, but reports success (exit 0)."""
    from duplex.errors import WorkerCrashedError
    from duplex.worker.wiring import Worker

    original = Worker.stop

    def stop(self: Worker) -> dict[str, Any]:
        try:
            return original(self)
        except WorkerCrashedError:
            return {}

    Worker.stop = stop  # type: ignore[method-assign]


def _break_crash_thread_traceback() -> None:
    """The watchdog stops the worker, then dies of an exception (a traceback on stderr)."""
    from duplex.worker.wiring import Worker

    original = Worker._crash

    def crash(self: Worker, dead: list[str]) -> None:
        original(self, dead)
        raise RuntimeError("watchdog bug")

    Worker._crash = crash  # type: ignore[method-assign]


def _break_handler_worker_stops_worker() -> None:
    """A failed HandlerWorker is not restarted: it fails the whole worker like any actor."""
    from duplex.actors.handler_worker import HandlerWorker

    def on_failure(self: Any, exc_type: Any, exc: Any, tb: Any) -> None:
        self._supervisor.actor_failed(f"HandlerWorker {self._worker_id}", exc)

    setattr(HandlerWorker, "on_failure", on_failure)  # noqa: B010


def _break_recover_own_claims() -> None:
    """Recovery counts the worker's own running attempts as lost."""
    import duplex.commit.committer as committer

    # Both the read that decides whether to recover and the recovery itself.
    for name in ("has_lost_claims", "recover_lost_claims"):
        original = getattr(committer, name)

        def recover(
            conn: Any, *, me: str, dead_workers: Any = (), _original: Any = original, **kwargs: Any
        ) -> Any:
            return _original(conn, me="", dead_workers=[*dead_workers, me], **kwargs)

        setattr(committer, name, recover)


def _break_no_pid_recovery() -> None:
    """A worker whose process is gone on this host is only noticed by its stale heartbeat."""
    import duplex.commit.committer as committer

    setattr(committer, "dead_local_workers", lambda conn, **kwargs: [])  # noqa: B010


def _break_drain_drops() -> None:
    """On stop, the CompletionProcessor forgets what it holds instead of committing it."""
    from duplex.actors.completion_processor import CompletionProcessor

    def drain(self: Any, timeout_s: float) -> int:
        self._buffer.outcomes.clear()
        self._buffer.releases.clear()
        return 0

    CompletionProcessor.drain = drain  # type: ignore[method-assign]


def _break_drain_skipped() -> None:
    """On stop, the CompletionProcessor claims it committed everything without trying."""
    from duplex.actors.completion_processor import CompletionProcessor

    CompletionProcessor.drain = lambda self, timeout_s: 0  # type: ignore[method-assign]


def _break_double_dispatch() -> None:
    """The Dispatcher runs every claimed attempt twice."""
    from duplex.actors.dispatcher import Dispatcher

    original = Dispatcher.dispatch

    def dispatch(self: Any, steps: list[Any]) -> None:
        original(self, [*steps, *steps])

    Dispatcher.dispatch = dispatch  # type: ignore[method-assign]


def _break_late_results_recorded() -> None:
    """Every result is sent twice, and the commit records a transition for rejected ones too.

    Together: an attempt gets two outcomes (guarantee 3 broken).
    """
    from sqlalchemy import insert

    import duplex.actors.handler_worker as handler_worker
    import duplex.commit.committer as committer
    from duplex.clock import utcnow
    from duplex.storage.models import workflow_step_transitions
    from duplex.storage.transitions import transition_row

    original_tell = getattr(handler_worker, "tell")  # noqa: B009

    def tell(method: Any, *args: Any) -> bool:
        if getattr(method, "_attr_path", None) == ("submit",):
            original_tell(method, *args)
        return bool(original_tell(method, *args))

    setattr(handler_worker, "tell", tell)  # noqa: B010
    original_commit = getattr(committer, "commit_outcomes")  # noqa: B009

    def commit_outcomes(conn: Any, outcomes: Any, **kwargs: Any) -> Any:
        report = original_commit(conn, outcomes, **kwargs)
        for outcome in report.rejected:
            to_state = "complete" if outcome.failure is None else "waiting_for_retry"
            conn.execute(
                insert(workflow_step_transitions).values(
                    transition_row(
                        outcome.step.step_uuid,
                        "in_progress",
                        to_state,
                        outcome.step.attempt,
                        outcome.step.claimed_by,
                        utcnow(),
                        "late result",
                    )
                )
            )
        return report

    setattr(committer, "commit_outcomes", commit_outcomes)  # noqa: B010


def _break_settings_check_off() -> None:
    """The check that the heartbeat fits the liveness timeout is gone."""
    from duplex.settings import Settings

    Settings.__pydantic_decorators__.model_validators.pop(
        "_heartbeat_fits_the_liveness_timeout", None
    )


BREAKAGES: dict[str, Callable[[], None]] = {
    "crash_ignored": _break_crash_ignored,
    "crash_exit_zero": _break_crash_exit_zero,
    "crash_thread_traceback": _break_crash_thread_traceback,
    "handler_worker_stops_worker": _break_handler_worker_stops_worker,
    "recover_own_claims": _break_recover_own_claims,
    "no_pid_recovery": _break_no_pid_recovery,
    "drain_drops": _break_drain_drops,
    "drain_skipped": _break_drain_skipped,
    "double_dispatch": _break_double_dispatch,
    "late_results_recorded": _break_late_results_recorded,
    "settings_check_off": _break_settings_check_off,
}


def _install_from_env() -> None:
    for name in filter(None, (n.strip() for n in os.environ.get(BREAK_ENV, "").split(","))):
        if name not in BREAKAGES:
            raise ValueError(f"{BREAK_ENV}: unknown breakage {name!r} (one of {sorted(BREAKAGES)})")
        BREAKAGES[name]()
    spec = os.environ.get(FAULT_ENV)
    if spec:
        install_fault(spec)


_install_from_env()
