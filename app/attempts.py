"""A step's attempts, derived from its transition rows alone: the one source of attempt times
and durations for ``duplex status`` (text, ``--json``, ``--watch``) and the dashboard.

An attempt starts with a transition to ``in_progress`` (the claim; its row names the worker)
and ends with the step's next transition, whose target state is the attempt's outcome
(``complete``, ``waiting_for_retry``, ``error``, ``enqueued`` for a claim handed back,
``cancelled``). Both rows are written in the transactions that made those moves, so a
timed-out attempt lasts from its claim to the commit of its ``handler_timeout``, and an
operator's later ``resolve`` (a move out of ``error``) is no part of any attempt. An attempt
with no ending row is still running.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from duplex.states import IN_PROGRESS

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
        """From the claim to the outcome's commit; a running attempt, until ``now``."""
        return max(0.0, ((self.ended_at or now) - self.started_at).total_seconds())

    def duration_ms(self, now: datetime) -> int:
        return round(self.duration_s(now) * 1000)


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
