"""What decision and batch handlers return, and how an attempt's return value is read.

A decision step's handler returns ``Decision(["ship_express"])`` (an empty list is allowed:
no branch runs); a batch step's handler returns ``Batch(items)``. The commit that stores the
result applies it in the same transaction: it skips the branches not chosen, or creates one
item step per item (``duplex.storage.expansion``). Plain code, run on the handler's thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from duplex.dynamic.kinds import BATCH, DECISION
from duplex.errors import BATCH_TOO_LARGE, INVALID_RESULT
from duplex.flow.concurrency import KeyNotFound, concurrency_key
from duplex.messages import StepFailure


class Decision:
    """The branches a decision step takes, and optionally a result of its own (a dict)."""

    __slots__ = ("branches", "result")

    def __init__(self, branches: Iterable[str] = (), result: Mapping[str, Any] | None = None):
        if isinstance(branches, str):
            raise TypeError("Decision takes a list of branch names, not one string")
        self.branches = tuple(branches)
        self.result = dict(result) if result is not None else None

    def __repr__(self) -> str:
        return f"Decision({list(self.branches)!r})"


class Batch:
    """The items a batch step's worker runs once each (JSON values: records, ids, or cursors
    such as ``{"from": 0, "to": 1000}``), and optionally a result of its own (a dict)."""

    __slots__ = ("items", "result")

    def __init__(self, items: Iterable[Any], result: Mapping[str, Any] | None = None):
        self.items = list(items)
        self.result = dict(result) if result is not None else None

    def __repr__(self) -> str:
        return f"Batch(<{len(self.items)} items>)"


@dataclass(frozen=True, slots=True)
class Directive:
    """A decision's or batch's return value, checked: the step's result, and the branches
    chosen or the items to create (JSON values, as a reader of the database gets them)."""

    result: Any
    branches: tuple[str, ...] | None = None
    items: tuple[Any, ...] | None = None


def read_return_value(
    value: Any, kind: str, spec: Mapping[str, Any] | None, *, max_batch_items: int
) -> Directive | StepFailure:
    """Check a handler's return value against its step's kind.

    A decision must return ``Decision`` naming only declared branches; a batch must return
    ``Batch`` with at most ``max_batch_items`` JSON items; any other step must return neither.
    Every refusal is a permanent failure of the attempt (``invalid_result``, or
    ``batch_too_large``): the same handler would return the same value again.
    """
    if kind == DECISION:
        return _decision(value, spec or {})
    if kind == BATCH:
        return _batch(value, max_batch_items, spec)
    if isinstance(value, Decision | Batch):
        what = type(value).__name__
        return _invalid(f"only a {what.lower()} step may return {what}; this is a {kind} step")
    return Directive(value)


def _decision(value: Any, spec: Mapping[str, Any]) -> Directive | StepFailure:
    if not isinstance(value, Decision):
        return _invalid(f"a decision step returns Decision([...]), not {type(value).__name__}")
    declared = list(spec.get("branches") or ())
    unknown = [b for b in value.branches if b not in declared]
    if unknown:
        return _invalid(
            f"Decision names {', '.join(map(repr, unknown))}, which is not a branch of this "
            f"step (its branches: {', '.join(declared)})"
        )
    chosen = tuple(dict.fromkeys(value.branches))
    return Directive({**(value.result or {}), "branches": list(chosen)}, branches=chosen)


def _batch(
    value: Any, max_batch_items: int, spec: Mapping[str, Any] | None
) -> Directive | StepFailure:
    if not isinstance(value, Batch):
        return _invalid(f"a batch step returns Batch(items), not {type(value).__name__}")
    count = len(value.items)
    if count > max_batch_items:
        return StepFailure(
            BATCH_TOO_LARGE,
            f"Batch has {count} items, over the limit of {max_batch_items} "
            f"(worker.max_batch_items); return cursors over ranges instead",
            retryable=False,
        )
    try:
        # As a reader of the database gets them: tuples become lists, int keys strings.
        items = json.loads(json.dumps(value.items, allow_nan=False, ensure_ascii=False))
    except (TypeError, ValueError) as exc:
        return _invalid(f"a batch item is not JSON-serialisable: {exc}")
    problem = _item_key_problem(items, spec)
    if problem is not None:
        return _invalid(problem)
    return Directive({**(value.result or {}), "items": count}, items=tuple(items))


def _item_key_problem(items: list[Any], spec: Mapping[str, Any] | None) -> str | None:
    """Why an item has no value for its step's concurrency key in its inputs (the item step's
    inputs with ``item``; a key in the context was checked at submission)."""
    worker = (spec or {}).get("worker") or {}
    declared = worker.get("concurrency")
    if not declared or not str(declared["key"]).startswith("inputs."):
        return None
    inputs = worker.get("inputs") or {}
    for index, item in enumerate(items):
        try:
            concurrency_key(declared["key"], {}, {**inputs, "item": item})
        except KeyNotFound as exc:
            return f"batch item {index}: {exc}"
    return None


def _invalid(message: str) -> StepFailure:
    return StepFailure(INVALID_RESULT, message, retryable=False)
