"""Step and task states, and the legal moves between step states (docs/architecture.md, States)."""

from __future__ import annotations

from collections.abc import Mapping

PENDING = "pending"
ENQUEUED = "enqueued"
IN_PROGRESS = "in_progress"
WAITING_FOR_RETRY = "waiting_for_retry"
COMPLETE = "complete"
ERROR = "error"
CANCELLED = "cancelled"
RESOLVED_MANUALLY = "resolved_manually"

STEP_STATES = (
    PENDING,
    ENQUEUED,
    IN_PROGRESS,
    WAITING_FOR_RETRY,
    COMPLETE,
    ERROR,
    CANCELLED,
    RESOLVED_MANUALLY,
)
# States a claim may take a step from.
CLAIMABLE = (ENQUEUED, WAITING_FOR_RETRY)
# States that satisfy a dependency.
DONE = (COMPLETE, RESOLVED_MANUALLY)
# States in which a step may still run (now or later) without an operator.
ACTIVE = (ENQUEUED, IN_PROGRESS, WAITING_FOR_RETRY)
# States a step is created in (the ``from_state`` of its first transition row is NULL).
INITIAL = (PENDING, ENQUEUED)
# States an operator's cancel stops: everything that has not started yet.
CANCELLABLE = (PENDING, ENQUEUED, WAITING_FOR_RETRY)

STEP_TRANSITIONS: Mapping[str, frozenset[str]] = {
    PENDING: frozenset({ENQUEUED, CANCELLED, RESOLVED_MANUALLY}),
    ENQUEUED: frozenset({IN_PROGRESS, CANCELLED, RESOLVED_MANUALLY}),
    WAITING_FOR_RETRY: frozenset({IN_PROGRESS, CANCELLED, RESOLVED_MANUALLY}),
    # in_progress -> enqueued: a claim handed back, never started (worker stopping).
    # in_progress -> cancelled: a running step always finishes, but when its task was cancelled
    # meanwhile, the retry its failure would get (or the re-run of a handed-back claim) is
    # cancelled instead of scheduled.
    IN_PROGRESS: frozenset({COMPLETE, WAITING_FOR_RETRY, ERROR, ENQUEUED, CANCELLED}),
    ERROR: frozenset({ENQUEUED, RESOLVED_MANUALLY}),
    COMPLETE: frozenset(),
    CANCELLED: frozenset(),
    RESOLVED_MANUALLY: frozenset(),
}

# Task states.
TASK_PENDING = "pending"
TASK_IN_PROGRESS = "in_progress"
TASK_COMPLETE = "complete"
TASK_ERROR = "error"
TASK_CANCELLED = "cancelled"
TASK_STATES = (TASK_PENDING, TASK_IN_PROGRESS, TASK_COMPLETE, TASK_ERROR, TASK_CANCELLED)
# Task states nothing moves a task out of without an operator (``duplex retry``/``resolve``
# can bring an errored task back).
TASK_FINISHED = (TASK_COMPLETE, TASK_ERROR, TASK_CANCELLED)


def is_legal_step_transition(from_state: str | None, to_state: str) -> bool:
    """Tell whether a transition row may say ``from_state -> to_state`` (None: creation)."""
    if from_state is None:
        return to_state in INITIAL
    return to_state in STEP_TRANSITIONS.get(from_state, frozenset())


def derive_task_state(current: str, step_counts: Mapping[str, int]) -> str:
    """Return a task's state from how many of its steps are in each state.

    ``complete`` once every step is complete or resolved; ``error`` once a step failed for good
    and nothing can still run (pending steps only move when a running step completes);
    ``cancelled`` stays cancelled; otherwise ``in_progress`` (``pending`` before any claim).
    """
    if current == TASK_CANCELLED:
        return TASK_CANCELLED
    total = sum(step_counts.values())
    done = sum(step_counts.get(s, 0) for s in DONE)
    if total > 0 and done == total:
        return TASK_COMPLETE
    active = sum(step_counts.get(s, 0) for s in ACTIVE)
    if step_counts.get(ERROR, 0) > 0 and active == 0:
        return TASK_ERROR
    if current == TASK_PENDING and step_counts.get(IN_PROGRESS, 0) == 0 and done == 0:
        return TASK_PENDING
    return TASK_IN_PROGRESS
