"""What a running attempt reads and writes while it runs: its checkpoints, and the results of
the batch items its convergence step reads page by page (``duplex.handlers.StepStore``).

Both open a transaction of their own, short and independent of the commit path: a handler
calls them from its own thread, in the middle of its attempt.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import String, bindparam, cast, exists, select, update

from duplex.handlers import BatchResult
from duplex.messages import ClaimedStep
from duplex.states import IN_PROGRESS, TASK_CANCELLED
from duplex.storage.db import Database
from duplex.storage.models import tasks, unindexed, workflow_steps

ws = workflow_steps

# The guard of results (``duplex.storage.results``): still running, the same attempt, the
# same claimant; and the task not cancelled (``duplex cancel`` or its deadline), since a
# cancelled task's running attempt finishes without resuming anything, so nothing it would
# resume from should be kept either.
#
# One guarded UPDATE, no task lock, and that is enough under READ COMMITTED:
# - Every way a claim moves on (a commit of this attempt's outcome, a timeout, a recovery
#   as worker_lost, a new claim) updates this step's row. If that writer committed first,
#   the UPDATE reads the committed row; if it is still open, the UPDATE waits for it and
#   checks the guard again on the row it left (PostgreSQL re-evaluates the WHERE clause on
#   the new row version). A checkpoint is never saved over a claim that has moved on.
# - A cancel updates the task row, not a running step's. The NOT EXISTS reads the task as of
#   the statement's start: a checkpoint whose statement starts after the cancel committed is
#   rejected; one that started before it is ordered before the cancel, like a result
#   committed just before it.
# - It locks one row and waits for nothing while holding it, so it cannot join a deadlock
#   with the writers that lock tasks then steps (docs: the locking order of ``results``);
#   locking the task row too would make every checkpoint of a 100,000-item batch queue
#   behind the commits of that task.
# On SQLite ``BEGIN IMMEDIATE`` serialises writers, so the same statement is exact there.
_SAVE_CHECKPOINT = (
    update(ws)
    .where(
        ws.c.step_uuid == bindparam("b_step_uuid"),
        # ``|| ''``: found by primary key; the state index must not be preferred to it.
        unindexed(ws.c.state) == IN_PROGRESS,
        ws.c.attempts == bindparam("b_attempt"),
        ws.c.claimed_by == bindparam("b_claimed_by"),
        ~exists().where(tasks.c.task_uuid == ws.c.task_uuid, tasks.c.state == TASK_CANCELLED),
    )
    .values(checkpoint=bindparam("v_checkpoint", type_=ws.c.checkpoint.type))
)

# A batch's items are named ``WORKER[i]`` with ``item_index`` = i (``duplex.storage.expansion``):
# comparing the whole name built from the index matches exactly this batch's items, whatever
# characters the worker's name holds (no LIKE pattern to escape), and the range on
# ``item_index`` within the task walks the (task_uuid, item_index) index in order. The range
# is closed (``after < item_index <= after + limit``): a batch's items are numbered 0..N-1 with
# no gap, all created in one transaction and never removed alone, so the page is exactly that
# range; without the upper bound PostgreSQL's planner, expecting a handful of rows, read every
# later item and sorted them for each page (a full read grew with the square of the batch).
_ITEM_NAME = (
    bindparam("item_prefix", type_=String()).concat(cast(ws.c.item_index, String())).concat("]")
)
_BATCH_PAGE = (
    select(ws.c.item_index, ws.c.state, ws.c.results)
    .where(
        ws.c.task_uuid == bindparam("task_uuid"),
        ws.c.item_index > bindparam("after"),
        ws.c.item_index <= bindparam("upto"),
        ws.c.name == _ITEM_NAME,
    )
    .order_by(ws.c.item_index)
    .limit(bindparam("limit"))
)


class DatabaseStepStore:
    """``StepStore`` on the orchestration database; shared by every handler of a worker."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def save_checkpoint(self, step: ClaimedStep, state: Any) -> bool:
        """Save ``state`` as the step's checkpoint if ``step``'s attempt still holds its claim
        and its task is not cancelled; return whether it was saved. ``StorageError`` (the
        database failed) reaches the handler: whether the state is saved is then unknown."""
        with self._db.write() as conn:
            updated = conn.execute(
                _SAVE_CHECKPOINT,
                {
                    "b_step_uuid": step.step_uuid,
                    "b_attempt": step.attempt,
                    "b_claimed_by": step.claimed_by,
                    "v_checkpoint": state,
                },
            )
            return updated.rowcount == 1

    def batch_results(
        self, task_uuid: str, worker: str, *, after: int, limit: int
    ) -> list[BatchResult]:
        """Up to ``limit`` items of ``task_uuid``'s batch whose item step is ``worker``, with an
        index above ``after``, in index order."""
        if limit < 1:
            raise ValueError(f"a page of batch results holds at least one item, not {limit}")
        with self._db.read() as conn:
            rows = conn.execute(
                _BATCH_PAGE,
                {
                    "task_uuid": task_uuid,
                    "after": after,
                    "upto": after + limit,
                    "item_prefix": f"{worker}[",
                    "limit": limit,
                },
            )
            return [BatchResult(row.item_index, row.state, row.results) for row in rows]
