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
# Dynamic workflows (docs/workflows.md): a branch a decision did not choose, and every step
# that then can no longer run; a wait or sleep step whose dependencies are done, until its
# signal arrives or its time is up.
SKIPPED = "skipped"
WAITING = "waiting"

STEP_STATES = (
    PENDING,
    ENQUEUED,
    IN_PROGRESS,
    WAITING_FOR_RETRY,
    COMPLETE,
    ERROR,
    CANCELLED,
    RESOLVED_MANUALLY,
    SKIPPED,
    WAITING,
)
# States a claim may take a step from.
CLAIMABLE = (ENQUEUED, WAITING_FOR_RETRY)
# States that satisfy a dependency: a skipped parent counts as done, so a convergence step
# runs once every parent ran, was resolved or was skipped.
DONE = (COMPLETE, RESOLVED_MANUALLY, SKIPPED)
# States in which a step may still finish (now or later) without an operator.
ACTIVE = (ENQUEUED, IN_PROGRESS, WAITING_FOR_RETRY, WAITING)
# States a step is created in (the ``from_state`` of its first transition row is NULL): a
# root wait or sleep step starts waiting; a batch's items are created enqueued.
INITIAL = (PENDING, ENQUEUED, WAITING)
# States an operator's cancel stops: everything that has not started yet.
CANCELLABLE = (PENDING, ENQUEUED, WAITING_FOR_RETRY, WAITING)
# States ``duplex complete`` may give a result to: those ``duplex resolve`` accepts.
COMPLETABLE = (PENDING, ENQUEUED, WAITING_FOR_RETRY, ERROR, WAITING)

STEP_TRANSITIONS: Mapping[str, frozenset[str]] = {
    # pending -> complete (and the other -> complete below that no attempt makes): ``duplex
    # complete`` gives a step its result by hand.
    PENDING: frozenset({ENQUEUED, CANCELLED, RESOLVED_MANUALLY, SKIPPED, WAITING, COMPLETE}),
    # enqueued/waiting_for_retry -> waiting: held by its concurrency key at its limit.
    ENQUEUED: frozenset({IN_PROGRESS, WAITING, CANCELLED, RESOLVED_MANUALLY, COMPLETE}),
    WAITING_FOR_RETRY: frozenset({IN_PROGRESS, WAITING, CANCELLED, RESOLVED_MANUALLY, COMPLETE}),
    # waiting -> complete: the signal arrived (or the sleep ended); -> error: ``wait_timeout``;
    # -> enqueued: a slot of the concurrency key that held it freed.
    WAITING: frozenset({COMPLETE, ERROR, ENQUEUED, CANCELLED, RESOLVED_MANUALLY}),
    # in_progress -> enqueued: a claim handed back, never started (worker stopping).
    # in_progress -> cancelled: a running step always finishes, but when its task was cancelled
    # meanwhile, the retry its failure would get (or the re-run of a handed-back claim) is
    # cancelled instead of scheduled.
    # in_progress -> cancelled also: the attempt was cancelled while it ran (``duplex cancel``
    # of its task or of the step: ``error_type = cancelled``).
    IN_PROGRESS: frozenset({COMPLETE, WAITING_FOR_RETRY, ERROR, ENQUEUED, CANCELLED}),
    # error -> waiting: ``duplex retry`` of a wait step that timed out waits once more.
    ERROR: frozenset({ENQUEUED, RESOLVED_MANUALLY, WAITING, COMPLETE}),
    COMPLETE: frozenset(),
    # cancelled -> enqueued/waiting: ``duplex retry`` of a step cancelled on its own
    # (``duplex cancel --step``) while its task goes on; a cancelled task's steps stay.
    CANCELLED: frozenset({ENQUEUED, WAITING}),
    RESOLVED_MANUALLY: frozenset(),
    SKIPPED: frozenset(),
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

    ``complete`` once every step is complete, resolved or skipped; ``error`` once a step failed
    for good (or was cancelled on its own, ``duplex cancel --step``: its dependents can no
    longer run either) and nothing can still run (pending steps only move when a running step
    completes); ``cancelled`` stays cancelled; otherwise ``in_progress`` (``pending`` before
    any claim).
    """
    if current == TASK_CANCELLED:
        return TASK_CANCELLED
    total = sum(step_counts.values())
    done = sum(step_counts.get(s, 0) for s in DONE)
    if total > 0 and done == total:
        return TASK_COMPLETE
    active = sum(step_counts.get(s, 0) for s in ACTIVE)
    stopped = step_counts.get(ERROR, 0) + step_counts.get(CANCELLED, 0)
    if stopped > 0 and active == 0:
        return TASK_ERROR
    if current == TASK_PENDING and step_counts.get(IN_PROGRESS, 0) == 0 and done == 0:
        return TASK_PENDING
    return TASK_IN_PROGRESS
