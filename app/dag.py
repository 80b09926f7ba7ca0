"""The order of a workflow's steps: parents first (Kahn's algorithm), or the cycle that
prevents one. Plain code on anything with a ``name`` and ``depends_on``; the templates use it
to validate a DAG and to number its steps.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol


class Step(Protocol):
    """What ordering needs of a step: its name and the names it depends on."""

    @property
    def name(self) -> str: ...

    @property
    def depends_on(self) -> Sequence[str]: ...


def topological_order(
    steps: Sequence[Step], index: Mapping[str, int]
) -> tuple[list[int], list[str]]:
    """Order step positions parents first; return the order and a cycle, if any.

    ``index`` must name every dependency. The ready set is a heap of template
    positions, so among ready steps the earliest in the template goes first.
    """
    children: list[list[int]] = [[] for _ in steps]
    waiting = [len(step.depends_on) for step in steps]
    for position, step in enumerate(steps):
        for dependency in step.depends_on:
            children[index[dependency]].append(position)

    ready = [position for position, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        position = heapq.heappop(ready)
        order.append(position)
        for child in children[position]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, child)

    if len(order) == len(steps):
        return order, []
    return order, _find_cycle(steps, index, (p for p, count in enumerate(waiting) if count))


def _find_cycle(
    steps: Sequence[Step], index: Mapping[str, int], blocked: Iterable[int]
) -> list[str]:
    """Return the names of one cycle among the blocked steps, in execution order.

    Every step Kahn could not order still waits on a parent that is also
    blocked, so walking parent links from any blocked step must revisit one.
    """
    blocked_set = set(blocked)
    start = min(blocked_set)
    seen_at: dict[int, int] = {}
    walk: list[int] = []
    position = start
    while position not in seen_at:
        seen_at[position] = len(walk)
        walk.append(position)
        position = next(
            index[dependency]
            for dependency in steps[position].depends_on
            if index[dependency] in blocked_set
        )
    # The walk follows child -> parent; reverse it to read parent -> child.
    cycle = walk[seen_at[position] :][::-1]
    # Start at the step earliest in the template so the message is stable.
    first = cycle.index(min(cycle))
    cycle = cycle[first:] + cycle[:first]
    return [steps[p].name for p in cycle]
