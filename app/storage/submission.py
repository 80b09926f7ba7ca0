"""Creating tasks from validated templates: task, steps and edges in one transaction."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert

from app.messages import JSONDict
from app.models import tasks, workflow_step_edges, workflow_step_transitions, workflow_steps
from app.states import ENQUEUED, PENDING, TASK_PENDING
from app.templates import TaskTemplate

# SQLite caps bound parameters per statement; insert big workflows in slices.
_CHUNK = 500


def create_task(
    conn: Connection,
    template: TaskTemplate,
    context: JSONDict,
    *,
    now: datetime,
    task_uuid: str | None = None,
) -> str:
    """Write the task, its steps and edges; roots start ``enqueued``, the rest ``pending``."""
    task_id = task_uuid or str(uuid.uuid4())
    conn.execute(
        insert(tasks).values(
            task_uuid=task_id,
            name=template.name,
            namespace=template.namespace,
            version=template.version,
            state=TASK_PENDING,
            context=context,
            created_at=now,
            updated_at=now,
        )
    )
    step_ids = {step.name: str(uuid.uuid4()) for step in template.steps}
    step_rows: list[dict[str, Any]] = []
    transition_rows: list[dict[str, Any]] = []
    edge_rows: list[dict[str, Any]] = []
    for position, step in enumerate(template.topological_order()):
        state = PENDING if step.depends_on else ENQUEUED
        step_rows.append(
            {
                "step_uuid": step_ids[step.name],
                "task_uuid": task_id,
                "namespace": template.namespace,
                "name": step.name,
                "handler": step.handler,
                "position": position,
                "state": state,
                "attempts": 0,
                "max_attempts": step.max_attempts,
                "retryable": step.retryable,
                "timeout_ms": step.timeout_ms,
                "inputs": step.inputs,
                "declared_events": [e.model_dump() for e in step.events],
                "next_attempt_at": now if state == ENQUEUED else None,
                "created_at": now,
                "updated_at": now,
            }
        )
        transition_rows.append(
            {
                "step_uuid": step_ids[step.name],
                "from_state": None,
                "to_state": state,
                "attempt": 0,
                "worker_id": None,
                "reason": "submitted",
                "created_at": now,
            }
        )
        edge_rows.extend(
            {"from_step_uuid": step_ids[parent], "to_step_uuid": step_ids[step.name]}
            for parent in step.depends_on
        )
    for table, rows in (
        (workflow_steps, step_rows),
        (workflow_step_edges, edge_rows),
        (workflow_step_transitions, transition_rows),
    ):
        for start in range(0, len(rows), _CHUNK):
            conn.execute(insert(table), rows[start : start + _CHUNK])
    return task_id
