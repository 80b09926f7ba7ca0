"""The timeline: every attempt of a task on one time axis, so steps running side by side and
each retry are visible at a glance. The attempts themselves come from the transition rows
(``duplex.attempts``), as ``duplex status`` reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from duplex.attempts import Attempt


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
