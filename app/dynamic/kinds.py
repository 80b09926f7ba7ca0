"""Step kinds: how a template declares them, what a valid shape is, what each kind stores.

A ``handler`` step (the default) runs its handler. A ``decision`` step runs its handler, which
returns ``Decision([...])``: the branches it names run, the others are skipped. A ``batch``
step's handler returns ``Batch(items)``: its ``worker`` step is created once per item. A
``wait`` step runs no handler: a signal completes it. A ``sleep`` step completes when its
``duration`` has passed. Plain code on validated template steps; no SQL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal, Protocol

HANDLER = "handler"
DECISION = "decision"
BATCH = "batch"
WAIT = "wait"
SLEEP = "sleep"
StepKind = Literal["handler", "decision", "batch", "wait", "sleep"]
# Kinds whose step runs a handler; the others are finished by a signal or by time.
RUNS_HANDLER = (HANDLER, DECISION, BATCH)
WAITS = (WAIT, SLEEP)
# A handler step's timeout is an attempt's deadline on a timer; a wait's is only a row's time.
MAX_HANDLER_TIMEOUT_MS = 604_800_000  # 7 days
MAX_WAIT_TIMEOUT_MS = 31_536_000_000  # 365 days


class DeclaredStep(Protocol):
    """What shape checks need of a template step (``duplex.templates.StepTemplate``)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def handler(self) -> str | None: ...
    @property
    def depends_on(self) -> Sequence[str]: ...
    @property
    def branches(self) -> Sequence[str]: ...
    @property
    def worker(self) -> str | None: ...
    @property
    def signal(self) -> str | None: ...
    @property
    def duration(self) -> timedelta | None: ...
    @property
    def timeout_ms(self) -> int | None: ...
    @property
    def retry(self) -> Any: ...


def step_problems(step: DeclaredStep) -> list[str]:
    """What is wrong with one step's kind-specific keys (empty: nothing)."""
    name, kind = step.name, step.kind
    problems: list[str] = []

    def only(key: str, present: bool, kinds: tuple[str, ...]) -> None:
        if present and kind not in kinds:
            problems.append(
                f"step {name!r}: `{key}` is for a {' or '.join(kinds)} step, not a {kind} step"
            )

    only("branches", bool(step.branches), (DECISION,))
    only("worker", step.worker is not None, (BATCH,))
    only("signal", step.signal is not None, (WAIT,))
    only("duration", step.duration is not None, (SLEEP,))
    only("retry", step.retry is not None, RUNS_HANDLER)
    only("timeout_ms", step.timeout_ms is not None, (*RUNS_HANDLER, WAIT))
    if kind in RUNS_HANDLER and step.handler is None:
        problems.append(f"step {name!r}: a {kind} step needs a `handler`")
    if kind in WAITS and step.handler is not None:
        problems.append(f"step {name!r}: a {kind} step runs no handler; remove `handler`")
    if kind == DECISION and not step.branches:
        problems.append(f"step {name!r}: a decision step lists its `branches`")
    if kind == BATCH and step.worker is None:
        problems.append(f"step {name!r}: a batch step names its item step with `worker`")
    if kind == WAIT and step.signal is None:
        problems.append(f"step {name!r}: a wait step names the `signal` it waits for")
    if kind == SLEEP and step.duration is None:
        problems.append(f'step {name!r}: a sleep step needs a `duration` such as "5m"')
    if kind in RUNS_HANDLER and (step.timeout_ms or 0) > MAX_HANDLER_TIMEOUT_MS:
        problems.append(f"step {name!r}: timeout_ms is over the limit of 7 days for a handler")
    if len(set(step.branches)) != len(step.branches):
        problems.append(f"step {name!r}: a branch is listed twice")
    return problems


def shape_problems(steps: Sequence[DeclaredStep]) -> list[str]:
    """What is wrong with how the steps' kinds fit together (empty: nothing).

    A step is skipped only when every parent it has was skipped, and a skipped parent counts
    as done; so in a template that passes these checks every step can run in some run, and no
    step waits forever for a branch that was not taken (docs/workflows.md, Decisions).
    """
    by_name = {step.name: step for step in steps}
    problems: list[str] = []
    branch_of: dict[str, str] = {}
    worker_of: dict[str, str] = {}
    signals: dict[str, str] = {}
    for step in steps:
        for branch in step.branches:
            target = by_name.get(branch)
            if target is None:
                problems.append(f"decision {step.name!r}: branch {branch!r} is not a step")
                continue
            if step.name not in target.depends_on:
                problems.append(
                    f"decision {step.name!r}: branch {branch!r} does not depend on it "
                    f"(add {step.name!r} to its depends_on)"
                )
            if branch in branch_of and branch_of[branch] != step.name:
                problems.append(
                    f"step {branch!r} is a branch of two decisions "
                    f"({branch_of[branch]!r} and {step.name!r})"
                )
            branch_of.setdefault(branch, step.name)
        if step.worker is not None:
            problems.extend(_worker_problems(step, by_name.get(step.worker), worker_of))
        if step.signal is not None:
            if step.signal in signals:
                problems.append(
                    f"signal {step.signal!r} is waited for by two steps "
                    f"({signals[step.signal]!r} and {step.name!r})"
                )
            signals.setdefault(step.signal, step.name)
    for branch, decision in branch_of.items():
        if branch in worker_of:
            problems.append(
                f"step {branch!r} is both a branch of {decision!r} and the item step of "
                f"{worker_of[branch]!r}"
            )
    return problems


def _worker_problems(
    batch: DeclaredStep, worker: DeclaredStep | None, worker_of: dict[str, str]
) -> list[str]:
    name = batch.worker
    if worker is None:
        return [f"batch {batch.name!r}: worker {name!r} is not a step"]
    problems = []
    if tuple(worker.depends_on) != (batch.name,):
        problems.append(
            f"batch {batch.name!r}: its item step {name!r} must depend on it and on nothing "
            f"else (depends_on = [{batch.name!r}])"
        )
    if worker.kind != HANDLER:
        problems.append(
            f"batch {batch.name!r}: its item step {name!r} must be a handler step, "
            f"not a {worker.kind} step"
        )
    if name in worker_of:
        problems.append(f"step {name!r} is the item step of two batches")
    worker_of[str(name)] = batch.name
    return problems


def item_steps(steps: Sequence[DeclaredStep]) -> dict[str, str]:
    """{item step name: its batch step's name}: the steps created per item, not at submission."""
    return {step.worker: step.name for step in steps if step.worker is not None}


def submitted_parents(step: DeclaredStep, items: Mapping[str, str]) -> list[str]:
    """The parents ``step`` gets at submission: a dependency on an item step is a dependency
    on its batch step until the batch's items exist (each item becomes a parent then)."""
    parents: list[str] = []
    for parent in step.depends_on:
        parent = items.get(parent, parent)
        if parent not in parents:
            parents.append(parent)
    return parents
