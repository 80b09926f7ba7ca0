"""Readiness: the pending children of completed steps become ``enqueued`` once all their
parents are done: complete, resolved or skipped (``duplex.states.DONE``).

Each step made ready is returned with its namespace, so that the commit that made it ready
can claim it at once when it is the committing worker's to run (``claim_dependents``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Connection, bindparam, exists, not_, select, update

from duplex.states import (
    DONE,
    ENQUEUED,
    PENDING,
    SKIPPED,
)
from duplex.storage.models import (
    unindexed,
    workflow_step_edges,
    workflow_steps,
)

ws = workflow_steps


_other_edge = workflow_step_edges.alias("other_edge")
_other_parent = ws.alias("other_parent")


def pending_children_whose_parents_are_all(states: Sequence[str]) -> list[ColumnElement[bool]]:
    """The WHERE of a pending child of ``:parents`` whose every parent is in ``states``."""
    return [
        unindexed(ws.c.state) == PENDING,
        ws.c.step_uuid.in_(
            select(workflow_step_edges.c.to_step_uuid).where(
                workflow_step_edges.c.from_step_uuid.in_(bindparam("parents", expanding=True))
            )
        ),
        not_(
            exists().where(
                _other_edge.c.to_step_uuid == ws.c.step_uuid,
                _other_parent.c.step_uuid == _other_edge.c.from_step_uuid,
                not_(_other_parent.c.state.in_(states)),
            )
        ),
    ]


_ENQUEUE_READY = (
    update(ws)
    .where(*pending_children_whose_parents_are_all(DONE))
    .values(
        state=ENQUEUED,
        next_attempt_at=bindparam("now", type_=ws.c.next_attempt_at.type),
        updated_at=bindparam("now", type_=ws.c.updated_at.type),
    )
    .returning(
        ws.c.step_uuid,
        ws.c.namespace,
        ws.c.priority,
        ws.c.kind,
        # The columns, not ``key IS NOT NULL OR rate IS NOT NULL``: SQLite 3.40 returns 1 for
        # that expression in this RETURNING when both are NULL.
        ws.c.concurrency_key,
        ws.c.rate_limit,
    )
)


class ReadyStep(NamedTuple):
    """A step just made ready, and the namespace whose workers may claim it."""

    step_uuid: str
    namespace: str
    # Which of them the commit may claim first (``claim_dependents``).
    priority: int = 0
    # A wait or sleep step made ready starts waiting instead (``duplex.storage.expansion``).
    kind: str = "handler"
    # Under a concurrency key or a rate limit (True when not known): a commit claiming it
    # counts its key or takes its tokens; claiming none of those costs no such read.
    limited: bool = True


def enqueue_ready_dependents(
    conn: Connection, parents: Iterable[str], *, now: datetime
) -> list[ReadyStep]:
    """Enqueue pending children of ``parents`` whose parents are now all complete or resolved;
    return them in step-uuid order."""
    rows = conn.execute(_ENQUEUE_READY, {"parents": list(parents), "now": now})
    return sorted(
        ReadyStep(
            row.step_uuid,
            row.namespace,
            row.priority,
            row.kind,
            row.concurrency_key is not None or row.rate_limit is not None,
        )
        for row in rows
    )


# What a claimed step gets from its parents (``ctx.dependency_results``).
_parent = ws.alias("parent")
# A batch's items are not read here: a convergence reads them page by page
# (``ctx.batch_results``), however many there are.
_PARENT_RESULTS = (
    select(workflow_step_edges.c.to_step_uuid, _parent.c.name, _parent.c.state, _parent.c.results)
    .join(_parent, _parent.c.step_uuid == workflow_step_edges.c.from_step_uuid)
    .where(
        workflow_step_edges.c.to_step_uuid.in_(bindparam("ids", expanding=True)),
        _parent.c.item_index.is_(None),
    )
)


def parent_results(
    conn: Connection, step_uuids: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Each step's parents' results by name, and the names of its skipped parents."""
    rows = conn.execute(_PARENT_RESULTS, {"ids": step_uuids})
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, list[str]] = {}
    for child, name, state, value in rows:
        if state == SKIPPED:
            skipped.setdefault(child, []).append(name)
        else:
            results.setdefault(child, {})[name] = value or {}
    return results, skipped
