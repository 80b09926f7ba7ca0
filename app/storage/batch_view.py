"""How ``duplex status`` and the dashboard show a dynamic task: batch items as groups, pages of
items, and one line on what a skipped or waiting step is about.

A batch may have 100k items: they are counted per state in SQL (one GROUP BY over the task's
items, on the ``(task_uuid, item_index)`` index) and listed a page at a time, never loaded to
be counted. Items share their batch step's ``position``, which is how a group finds its batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, func, select

from duplex.dynamic.kinds import BATCH, SLEEP, WAIT
from duplex.states import (
    COMPLETE,
    DONE,
    ENQUEUED,
    ERROR,
    IN_PROGRESS,
    PENDING,
    SKIPPED,
    WAITING,
    WAITING_FOR_RETRY,
)
from duplex.storage.models import workflow_steps as ws

# How many items one page of a batch lists (the dashboard's item pages).
ITEM_PAGE = 100
# The order a group's counts are shown in: what needs an eye first.
_STATE_ORDER = (COMPLETE, IN_PROGRESS, ENQUEUED, WAITING_FOR_RETRY, ERROR)
# Between the item step's name and the number of items ("line x 500", with the real sign).
TIMES = "\N{MULTIPLICATION SIGN}"
_WORDS = {IN_PROGRESS: "running", ENQUEUED: "queued", WAITING_FOR_RETRY: "waiting to retry"}


@dataclass(frozen=True)
class BatchGroup:
    """One batch step's items, counted per state."""

    batch_uuid: str
    batch_name: str
    worker: str
    position: int
    counts: dict[str, int]
    # The steps that wait for every item (from the batch's spec).
    convergence: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return sum(self.counts.get(state, 0) for state in DONE)

    @property
    def state(self) -> str:
        """One state standing for the group (the graph's node colour): a failure first, then
        work running, then finished; ``pending`` before the batch made its items."""
        for state in (ERROR, IN_PROGRESS, WAITING_FOR_RETRY):
            if self.counts.get(state):
                return state
        if self.total == 0:
            return PENDING
        return COMPLETE if self.done == self.total else ENQUEUED

    def ordered_counts(self) -> list[tuple[str, int]]:
        known = [(s, self.counts[s]) for s in _STATE_ORDER if self.counts.get(s)]
        rest = sorted((s, n) for s, n in self.counts.items() if s not in _STATE_ORDER and n)
        return known + rest

    @property
    def label(self) -> str:
        return f"{self.worker} {TIMES} {self.total}"

    def counts_text(self) -> str:
        """``480 complete, 20 running`` (``no items yet`` before the batch ran)."""
        if self.total == 0:
            return "no items yet"
        return ", ".join(
            f"{n} {_WORDS.get(s, s.replace('_', ' '))}" for s, n in self.ordered_counts()
        )

    def summary(self) -> str:
        """``line`` times ``500: 480 complete, 20 running``: the one line a batch's items get."""
        return f"{self.label}: {self.counts_text()}"

    def as_json(self) -> dict[str, Any]:
        return {
            "batch": self.batch_name,
            "batch_uuid": self.batch_uuid,
            "worker": self.worker,
            "items": self.total,
            "done": self.done,
            "states": dict(self.ordered_counts()),
        }


_BATCH_STEPS = select(ws.c.step_uuid, ws.c.name, ws.c.position, ws.c.spec).where(
    ws.c.task_uuid == bindparam("task_uuid"), ws.c.kind == BATCH, ws.c.item_index.is_(None)
)
_ITEM_COUNTS = (
    select(ws.c.position, ws.c.state, func.count())
    .where(ws.c.task_uuid == bindparam("task_uuid"), ws.c.item_index.is_not(None))
    .group_by(ws.c.position, ws.c.state)
)


def batch_groups(conn: Connection, task_uuid: str) -> list[BatchGroup]:
    """Every batch step of a task, with its items counted per state, in template order."""
    batches = list(conn.execute(_BATCH_STEPS, {"task_uuid": task_uuid}))
    if not batches:
        return []
    counts: dict[int, dict[str, int]] = {}
    for position, state, count in conn.execute(_ITEM_COUNTS, {"task_uuid": task_uuid}):
        counts.setdefault(position, {})[state] = int(count)
    groups = []
    for row in sorted(batches, key=lambda r: r.position):
        spec = row.spec or {}
        worker = (spec.get("worker") or {}).get("name") or "items"
        groups.append(
            BatchGroup(
                batch_uuid=row.step_uuid,
                batch_name=row.name,
                worker=worker,
                position=row.position,
                counts=counts.get(row.position, {}),
                convergence=tuple(spec.get("convergence") or ()),
            )
        )
    return groups


@dataclass(frozen=True)
class ItemRow:
    step_uuid: str
    name: str
    item_index: int
    state: str
    attempts: int
    max_attempts: int
    error: Any
    claimed_by: str | None


@dataclass(frozen=True)
class ItemPage:
    """Items ``start`` .. ``start + len(rows) - 1`` of a batch; ``more``: items follow."""

    group: BatchGroup
    task_uuid: str
    rows: list[ItemRow]
    start: int
    page_size: int
    more: bool


_ITEMS = (
    select(
        ws.c.step_uuid,
        ws.c.name,
        ws.c.item_index,
        ws.c.state,
        ws.c.attempts,
        ws.c.max_attempts,
        ws.c.error,
        ws.c.claimed_by,
    )
    .where(
        ws.c.task_uuid == bindparam("task_uuid"),
        ws.c.item_index >= bindparam("start"),
        ws.c.position == bindparam("position"),
    )
    .order_by(ws.c.item_index)
    .limit(bindparam("limit"))
)


def item_page(
    conn: Connection, task_uuid: str, group: BatchGroup, *, start: int, limit: int = ITEM_PAGE
) -> ItemPage:
    """One page of a batch's items from ``item_index`` ``start`` on: a range of the
    ``(task_uuid, item_index)`` index, however many items the batch has (no OFFSET scan)."""
    found = list(
        conn.execute(
            _ITEMS,
            {
                "task_uuid": task_uuid,
                "start": start,
                "position": group.position,
                "limit": limit + 1,
            },
        )
    )
    rows = [ItemRow(*row) for row in found[:limit]]
    return ItemPage(group, task_uuid, rows, start, limit, more=len(found) > limit)


# --- what a skipped or waiting step is about -----------------------------------------------

_DECISION = re.compile(r"decision (\S+?)\)?$")


def skipped_by(reason: str | None) -> str | None:
    """The decision named in a ``skipped`` transition's reason ("not chosen by decision D",
    "every dependency skipped (decision D)")."""
    found = _DECISION.search(reason or "")
    return found.group(1) if found else None


def step_note(
    state: str, kind: str, spec: Any, next_attempt_at: datetime | None, reason: str | None
) -> str | None:
    """One line on why a skipped step did not run, or what a waiting step waits for; None
    for any other step. ``reason``: the reason of the step's last transition row."""
    if state == SKIPPED:
        return reason or "skipped"
    if state != WAITING:
        return None
    until = f" until {_utc(next_attempt_at)}" if next_attempt_at is not None else ""
    if kind == SLEEP:
        return f"sleeping{until}"
    if kind == WAIT:
        return f"waiting for signal {(spec or {}).get('signal')}{until}"
    # A step that runs a handler waits only when its concurrency key held it: the reason says so.
    return reason or f"waiting{until}"


def _utc(moment: datetime) -> str:
    if moment.tzinfo is None:  # SQLite gives back naive UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
