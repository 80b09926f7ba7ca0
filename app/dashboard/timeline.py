"""Attempts and the timeline, derived from the transition rows alone.

An attempt starts with a transition to ``in_progress`` (its row names the worker) and ends
with the step's next transition, whose target state is the attempt's outcome (``complete``,
``waiting_for_retry``, ``error``, ``enqueued`` for a claim handed back, ``cancelled``). An
attempt with no such row is still running. The timeline places every attempt of a task on
one time axis, so steps running side by side and each retry are visible at a glance.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from app.states import IN_PROGRESS

RUNNING = "running"


class Transition(Protocol):
    @property
    def step_uuid(self) -> str: ...
    @property
    def to_state(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def worker_id(self) -> str | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def created_at(self) -> datetime: ...


@dataclass(frozen=True, slots=True)
class Attempt:
    step_uuid: str
    number: int
    worker_id: str | None
    started_at: datetime
    ended_at: datetime | None
    outcome: str  # the state the attempt ended in, or "running"
    reason: str | None  # the ending transition's reason (error type and message, lost worker)

    def duration_s(self, now: datetime) -> float:
        return max(0.0, ((self.ended_at or now) - self.started_at).total_seconds())


def attempts(transitions: Iterable[Transition]) -> dict[str, list[Attempt]]:
    """Each step's attempts, oldest first, from its transition rows in write order."""
    out: dict[str, list[Attempt]] = {}
    open_attempt: dict[str, Attempt] = {}
    for tr in transitions:
        current = open_attempt.pop(tr.step_uuid, None)
        if current is not None:
            out.setdefault(tr.step_uuid, []).append(
                Attempt(
                    current.step_uuid,
                    current.number,
                    current.worker_id,
                    current.started_at,
                    tr.created_at,
                    tr.to_state,
                    tr.reason,
                )
            )
        if tr.to_state == IN_PROGRESS:
            open_attempt[tr.step_uuid] = Attempt(
                tr.step_uuid, tr.attempt, tr.worker_id, tr.created_at, None, RUNNING, None
            )
    for step_uuid, current in open_attempt.items():
        out.setdefault(step_uuid, []).append(current)
    return out


@dataclass(frozen=True, slots=True)
class Bar:
    attempt: Attempt
    left: float  # percent of the axis
    width: float  # percent of the axis, at least ``min_width`` so a 1 ms attempt shows


@dataclass(frozen=True, slots=True)
class Lane:
    step_uuid: str
    label: str
    bars: list[Bar]


@dataclass(frozen=True, slots=True)
class Timeline:
    lanes: list[Lane]
    start: datetime | None
    end: datetime | None
    lanes_hidden: int  # lanes left out beyond ``max_lanes``

    @property
    def span_s(self) -> float:
        if self.start is None or self.end is None:
            return 0.0
        return (self.end - self.start).total_seconds()


def timeline(
    steps: Sequence[tuple[str, str]],
    by_step: dict[str, list[Attempt]],
    *,
    now: datetime,
    max_lanes: int = 300,
    min_width: float = 0.4,
) -> Timeline:
    """One lane per step that has attempts (``steps`` = (uuid, label) in display order),
    lanes ordered by first start; a running attempt extends to ``now``."""
    tried = [(uuid, label) for uuid, label in steps if by_step.get(uuid)]
    if not tried:
        return Timeline([], None, None, 0)
    start = min(by_step[uuid][0].started_at for uuid, _ in tried)
    end = max(a.ended_at or now for uuid, _ in tried for a in by_step[uuid])
    span = max((end - start).total_seconds(), 1e-3)
    tried.sort(key=lambda item: by_step[item[0]][0].started_at)
    lanes = []
    for uuid, label in tried[:max_lanes]:
        bars = []
        for a in by_step[uuid]:
            left = (a.started_at - start).total_seconds() / span * 100
            width = max(min_width, a.duration_s(now) / span * 100)
            bars.append(Bar(a, round(min(left, 100 - min_width), 3), round(width, 3)))
        lanes.append(Lane(uuid, label, bars))
    return Timeline(lanes, start, end, max(0, len(tried) - max_lanes))
