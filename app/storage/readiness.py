"""Readiness: the pending children of completed steps become ``enqueued`` once all their
parents are done: complete, resolved or skipped (``duplex.states.DONE``).

Each step made ready is returned with its namespace, so that the commit that made it ready
can claim it at once when it is the committing worker's to run (``claim_dependents``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    Connection,
    Text,
    bindparam,
    exists,
    literal_column,
    not_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.elements import Label

from duplex.states import (
    DONE,
    ENQUEUED,
    PENDING,
    SKIPPED,
)
from duplex.storage.direct import DirectStatement
from duplex.storage.models import (
    unindexed,
    workflow_step_edges,
    workflow_steps,
)
from duplex.storage.planning import InValuesOf

ws = workflow_steps


_other_edge = workflow_step_edges.alias("other_edge")
_other_parent = ws.alias("other_parent")


def pending_children_whose_parents_are_all(states: Sequence[str]) -> list[ColumnElement[bool]]:
    """The WHERE of a pending child of ``:parents`` whose every parent is in ``states``."""
    return [
        unindexed(ws.c.state) == PENDING,
        InValuesOf(
            ws.c.step_uuid,
            select(workflow_step_edges.c.to_step_uuid).where(
                workflow_step_edges.c.from_step_uuid.in_(bindparam("parents", expanding=True))
            ),
        ),
        not_(
            exists().where(
                _other_edge.c.to_step_uuid == ws.c.step_uuid,
                _other_parent.c.step_uuid == _other_edge.c.from_step_uuid,
                not_(_other_parent.c.state.in_(states)),
            )
        ),
    ]


_ENQUEUE_READY = DirectStatement(
    update(ws)
    .where(*pending_children_whose_parents_are_all(DONE))
    .values(
        state=ENQUEUED,
        next_attempt_at=bindparam("now", type_=ws.c.next_attempt_at.type),
        updated_at=bindparam("now", type_=ws.c.updated_at.type),
    )
    .returning(
        ws.c.step_uuid,
        ws.c.task_uuid,
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
    # Its task ("" when not known): a task with a step made ready keeps running, so the
    # commit need not probe its steps' states (``duplex.storage.results``).
    task_uuid: str = ""


def enqueue_ready_dependents(
    conn: Connection, parents: Iterable[str], *, now: datetime
) -> list[ReadyStep]:
    """Enqueue pending children of ``parents`` whose parents are now all complete or resolved;
    return them in step-uuid order."""
    rows = _ENQUEUE_READY.rows(conn, {"parents": list(parents), "now": now})
    return sorted(
        ReadyStep(
            row.step_uuid,
            row.namespace,
            row.priority,
            row.kind,
            row.concurrency_key is not None or row.rate_limit is not None,
            row.task_uuid,
        )
        for row in rows
    )


# What a claimed step gets from its parents (``ctx.dependency_results``), read in the claim's
# own RETURNING: for the row claimed, its parents as one JSON array of [name, state, results].
# Each parent is looked up by its key from the claimed step's edges, a scalar subquery the
# planner cannot turn around: as a join, PostgreSQL without statistics of a task written
# moments ago (a row estimate of 1 for ``item_index IS NULL``) walked every step of the task
# for each claim. A batch's items are not read here: a convergence reads them page by page
# (``ctx.batch_results``), however many there are.
def _parents_read(aggregate: str, parent: str) -> str:
    return (
        f"(SELECT {aggregate} FROM (SELECT (SELECT {parent} FROM workflow_steps AS p"
        " WHERE p.step_uuid = e.from_step_uuid AND p.item_index IS NULL) AS parent"
        " FROM workflow_step_edges AS e WHERE e.to_step_uuid = workflow_steps.step_uuid)"
        " AS parents WHERE parent IS NOT NULL)"
    )


# SQLite gives each parent's results as their stored text, parsed here as the column's type
# would (SQLite's json() would rewrite them first).
RETURN_PARENTS: dict[str, Label[Any]] = {
    "sqlite": literal_column(
        _parents_read("json_group_array(json(parent))", "json_array(p.name, p.state, p.results)"),
        Text(),
    ).label("parents"),
    "postgresql": literal_column(
        _parents_read("jsonb_agg(parent)", "jsonb_build_array(p.name, p.state, p.results)"),
        JSONB(),
    ).label("parents"),
}


def parents_of(dialect: str, value: Any) -> tuple[dict[str, Any], list[str]]:
    """A claimed step's parents' results by name, and the names of its skipped parents, from
    what ``RETURN_PARENTS`` read."""
    if dialect == "sqlite":
        # Stored JSON text comes back a string; a bare number, stored by SQLite's NUMERIC
        # affinity as one, comes back as it is.
        parents = [
            (name, state, json.loads(results) if isinstance(results, str) else results)
            for name, state, results in json.loads(value or "[]")
        ]
    else:
        parents = value or []
    results: dict[str, Any] = {}
    skipped: list[str] = []
    for name, state, result in parents:
        if state == SKIPPED:
            skipped.append(name)
        else:
            results[name] = result or {}
    return results, skipped
