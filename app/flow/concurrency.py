"""A step's concurrency key: at most ``limit`` attempts with the same key run at once.

The template names where the key's value is (``key = "context.customer_id"``: a dotted path
into the task's context or the step's inputs); each step row stores the key made from that
value (``concurrency_key``, e.g. ``context.customer_id=c-17``) and the limit
(``concurrency_limit``). Steps whose paths and values are equal share a key, whichever
template or step they come from; each is held to its own limit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

# How many attempts one key may run at once, at most (a limit above any worker pool).
MAX_CONCURRENCY_LIMIT = 10_000
# The longest key stored (the path, ``=``, the value); a longer value is refused.
MAX_KEY_LENGTH = 255

_KEY_PATH = r"^(context|inputs)(\.[A-Za-z0-9_-]+)+$"


class ConcurrencyLimit(BaseModel):
    """``concurrency = { key = "context.customer_id", limit = 2 }`` in a step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: Annotated[str, Field(strict=True, pattern=_KEY_PATH)]
    limit: Annotated[int, Field(strict=True, ge=1, le=MAX_CONCURRENCY_LIMIT)]

    @property
    def reads_item(self) -> bool:
        """Whether the key is in a batch item (``inputs.item...``), known only when the
        batch step returns its items."""
        return self.key == "inputs.item" or self.key.startswith("inputs.item.")


class KeyNotFound(ValueError):
    """The value a concurrency key names is missing, or not a string, number or boolean."""


def concurrency_key(path: str, context: Mapping[str, Any], inputs: Mapping[str, Any]) -> str:
    """The key of a step whose template says ``key = path``, for this context and inputs."""
    root, *parts = path.split(".")
    value: Any = context if root == "context" else inputs
    where = "the task's context" if root == "context" else "the step's inputs"
    for depth, part in enumerate(parts):
        if not isinstance(value, Mapping) or part not in value:
            missing = ".".join([root, *parts[: depth + 1]])
            raise KeyNotFound(f"concurrency key {path}: {where} has no {missing}")
        value = value[part]
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool | int | float):
        text = json.dumps(value)
    else:
        kind = "null" if value is None else type(value).__name__
        raise KeyNotFound(
            f"concurrency key {path}: the value is {kind}, not a string, number or boolean"
        )
    key = f"{path}={text}"
    if len(key) > MAX_KEY_LENGTH:
        raise KeyNotFound(
            f"concurrency key {path}: the value is {len(text)} characters long, over the "
            f"{MAX_KEY_LENGTH - len(path) - 1} a key of this path may hold"
        )
    return key


class KeyedStep(Protocol):
    """What the checks need of a template step (``duplex.templates.StepTemplate``)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def worker(self) -> str | None: ...
    @property
    def inputs(self) -> dict[str, Any]: ...
    @property
    def concurrency(self) -> ConcurrencyLimit | None: ...


def concurrency_problems(steps: Sequence[KeyedStep]) -> list[str]:
    """What is wrong with the steps' concurrency keys (empty: nothing). A key is for a step
    that runs a handler; one in the step's own inputs must be there; one in a batch item
    (``inputs.item...``, read when the item is made) needs a step that is a batch's items."""
    items = {step.worker for step in steps if step.worker is not None}
    problems: list[str] = []
    for step in steps:
        declared = step.concurrency
        if declared is None:
            continue
        if step.kind in ("wait", "sleep"):
            problems.append(
                f"step {step.name!r}: a {step.kind} step runs no handler; `concurrency` is "
                "for the steps that do"
            )
        elif declared.reads_item:
            if step.name not in items:
                problems.append(
                    f"step {step.name!r}: concurrency key {declared.key} reads a batch item, "
                    "but the step is no batch step's `worker`"
                )
        elif declared.key.startswith("inputs."):
            try:
                concurrency_key(declared.key, {}, step.inputs)
            except KeyNotFound as exc:
                problems.append(f"step {step.name!r}: {exc}")
    return problems
