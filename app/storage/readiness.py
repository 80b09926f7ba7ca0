"""Readiness: the pending children of completed steps become ``enqueued`` once all their
parents are done: complete, resolved or skipped (``duplex.states.DONE``).

Each step made ready is returned with its namespace, so that the commit that made it ready
can claim it at once when it is the committing worker's to run (``claim_dependents``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import Connection, bindparam, exists, not_, select, update

from duplex.states import (
    DONE,
    ENQUEUED,
    PENDING,
)
from duplex.storage.models import (
    unindexed,
    workflow_step_edges,
    workflow_steps,
)

ws = workflow_steps


_other_edge = workflow_step_edges.alias("other_edge")
_other_parent = ws.alias("other_parent")
_ENQUEUE_READY = (
    update(ws)
    .where(
        unindexed(ws.c.state) == PENDING,
        ws.c.step_uuid.in_(
            select(workflow_step_edges.c.to_step_uuid).where(
                workflow_step_edges.c.from_step_uuid.in_(bindparam("parents", expanding=True))
            )
        ),
        # ...and no parent that is not yet complete or resolved.
        not_(
            exists().where(
                _other_edge.c.to_step_uuid == ws.c.step_uuid,
                _other_parent.c.step_uuid == _other_edge.c.from_step_uuid,
                not_(_other_parent.c.state.in_(DONE)),
            )
        ),
    )
    .values(
        state=ENQUEUED,
        next_attempt_at=bindparam("now", type_=ws.c.next_attempt_at.type),
        updated_at=bindparam("now", type_=ws.c.updated_at.type),
    )
    .returning(ws.c.step_uuid, ws.c.namespace, ws.c.priority, ws.c.kind)
)


class ReadyStep(NamedTuple):
    """A step just made ready, and the namespace whose workers may claim it."""

    step_uuid: str
    namespace: str
    # Which of them the commit may claim first (``claim_dependents``).
    priority: int = 0
    # A wait or sleep step made ready starts waiting instead (``duplex.storage.expansion``).
    kind: str = "handler"


def enqueue_ready_dependents(
    conn: Connection, parents: Iterable[str], *, now: datetime
) -> list[ReadyStep]:
    """Enqueue pending children of ``parents`` whose parents are now all complete or resolved;
    return them in step-uuid order."""
    rows = conn.execute(_ENQUEUE_READY, {"parents": list(parents), "now": now})
    return sorted(ReadyStep(row.step_uuid, row.namespace, row.priority, row.kind) for row in rows)
