"""The claim order: which due steps a claim takes first, and how it finds them cheaply.

A step's place is its ``claim_key``: the time it became ready (``next_attempt_at``: ready
since, or due at for a retry, or the start time of a delayed task) minus its priority times
the aging interval (``worker.priority_aging_ms``). Higher priority goes first, and waiting
ages a step up, so a step of low priority waits a bounded time behind a stream of higher
ones (docs/time.md, Priority).

How it is read, so that neither a backlog nor steps waiting for their time make a claim
slower: the claim index is (state, namespace, priority, next_attempt_at). ``due_levels`` finds
the priority levels that have a due step (a skip scan: a couple of index probes per level);
``due_steps`` reads each such level's first ``limit`` due steps as one index range in
``next_attempt_at`` order, and merges the levels by claim key. A step not yet due lies past
the end of its level's range, so it is never read; the cost of a claim grows with the number
of priority levels in use (at most 201), not with the number of steps.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    Integer,
    Select,
    String,
    bindparam,
    column,
    select,
    text,
    union_all,
)

from duplex.states import CLAIMABLE, WAITING_FOR_RETRY
from duplex.storage.direct import DirectStatement
from duplex.storage.models import workflow_steps
from duplex.storage.pauses import NOT_PAUSED
from duplex.templates import PRIORITY_MIN

# The tasks of paused templates, in the textual SQL below (``pauses.NOT_PAUSED`` elsewhere).
_TASKS_OF_PAUSED_TEMPLATES = (
    "SELECT t.task_uuid FROM pauses AS p JOIN tasks AS t ON t.name = p.name"
    " WHERE p.kind = 'template'"
)

ws = workflow_steps
# One priority level is worth this much waiting (``worker.priority_aging_ms``).
DEFAULT_AGING = timedelta(seconds=1)
# The lowest priority there can be, minus one: the floor of the claim order's skip scan.
PRIORITY_FLOOR = PRIORITY_MIN - 1


class DueSteps(NamedTuple):
    """The due steps a claim read, in claim order."""

    # step uuid -> the claimable state it was read in
    states: dict[str, str]
    # Whether any has a concurrency key or a rate limit: a claim of none of those reads no
    # flow control (``duplex.storage.concurrency.admit``).
    limited: bool = False


def due_steps(
    conn: Connection,
    namespaces: Sequence[str],
    *,
    limit: int,
    now: datetime,
    aging: timedelta = DEFAULT_AGING,
) -> DueSteps:
    """Return the first ``limit`` steps of ``namespaces`` due by ``now`` in claim order.

    Two statements: the due levels, then every due level's first ``limit`` steps in one
    union (on PostgreSQL each read ``FOR UPDATE SKIP LOCKED``). Each level is read only as
    far as it can matter: a level that has ``limit`` due steps bounds the claim key of the
    ``limit``-th step taken (``cut``), and no other level is read past that key. (The bound
    ``due_levels`` gives is the level's step at ``limit`` rounded up to a power of two: a later
    cut reads up to ``limit`` rows more per other due level, never misses one.)
    """
    levels = due_levels(conn, namespaces, now=now, nth=limit)
    if not levels:
        return DueSteps({})
    cut = min(
        (claim_key(level.nth, level.priority, aging) for level in levels if level.nth),
        default=None,
    )
    params: dict[str, Any] = {"limit": limit}
    for i, level in enumerate(levels):
        until = now if cut is None else min(now, cut + level.priority * aging)
        params.update(
            {
                f"s{i}": level.state,
                f"n{i}": level.namespace,
                f"p{i}": level.priority,
                f"c{i}": until,
            }
        )
    ready = ready_statement(len(levels), conn.dialect.name == "postgresql").rows(conn, params)
    rows = sorted(ready, key=lambda row: claim_order(row, aging))[:limit]
    return DueSteps(
        {row.step_uuid: row.state for row in rows},
        any(row.concurrency_key is not None or row.rate_limit is not None for row in rows),
    )


def claim_key(ready_at: datetime, priority: int, aging: timedelta) -> datetime:
    """A step's place in the claim order: the earlier, the sooner it is claimed.

    ``ready_at - priority * aging``: one priority level is worth ``aging`` of waiting, so a
    step of priority ``p`` ready at ``t`` goes before every step of priority at most ``q``
    that becomes ready after ``t + (q - p) * aging``; it waits behind later, higher-priority
    work for at most that long (docs/time.md, Priority). Retries that are due are placed by
    the same rule, ``ready_at`` being their due time.
    """
    return ready_at - priority * aging


def claim_order(row: Any, aging: timedelta) -> tuple[datetime, int, bool]:
    """Sort key of a ready row (``next_attempt_at``, ``priority``, ``state``): its claim key,
    then (ties) the higher priority, then a due retry before a first attempt."""
    return (
        claim_key(row.next_attempt_at, row.priority, aging),
        -row.priority,
        row.state != WAITING_FOR_RETRY,
    )


class Level(NamedTuple):
    """A priority level of a claimable state in a namespace that has due steps."""

    state: str
    namespace: str
    priority: int
    # ``next_attempt_at`` of its ``nth`` due step in index order, if it has that many.
    nth: datetime | None


def due_levels(
    conn: Connection,
    namespaces: Sequence[str],
    *,
    now: datetime,
    nth: int = 1,
) -> list[Level]:
    """Return each priority level that has a claimable step due by ``now``; highest priority
    first within a state.

    A skip scan of the claim index: one probe finds each level present, one more its first
    due step, whatever the number of steps in it; ``nth`` steps more of the index find the
    level's ``nth`` due step. ``nth`` is rounded up to a power of two (a level's ``nth`` may
    be a step further on): each such value is a statement of its own, with the offset
    written in, whose plan PostgreSQL keeps.
    """
    namespaces = list(dict.fromkeys(namespaces))
    params: dict[str, Any] = {"now": now}
    params.update({f"n{i}": namespace for i, namespace in enumerate(namespaces)})
    reach = 1 << (max(nth, 1) - 1).bit_length()
    rows = due_levels_statement(len(namespaces), reach).rows(conn, params)
    return [Level(row.state, row.namespace, int(row.priority), row.nth) for row in rows]


def _level_query(i: int, *, skip_locked: bool) -> Select[Any]:
    # One priority level of one state and namespace: its due steps, oldest first, read as one
    # range of the index (state, namespace, priority, next_attempt_at).
    query = (
        select(
            ws.c.step_uuid,
            ws.c.state,
            ws.c.next_attempt_at,
            ws.c.priority,
            ws.c.concurrency_key,
            ws.c.rate_limit,
        )
        .where(
            ws.c.state == bindparam(f"s{i}", type_=ws.c.state.type),
            ws.c.namespace == bindparam(f"n{i}", type_=ws.c.namespace.type),
            ws.c.priority == bindparam(f"p{i}", type_=Integer),
            # Due by now, and not past the cut (see ``due_steps``).
            ws.c.next_attempt_at <= bindparam(f"c{i}", type_=ws.c.next_attempt_at.type),
            NOT_PAUSED,
        )
        .order_by(ws.c.next_attempt_at)
        .limit(bindparam("limit", type_=Integer))
    )
    return query.with_for_update(skip_locked=True) if skip_locked else query


@functools.lru_cache(maxsize=512)
def ready_statement(levels: int, skip_locked: bool) -> DirectStatement:
    # Every due level in one statement, each read in index order up to the limit; the caller
    # keeps the first ``limit`` of them in claim order. On PostgreSQL the rows a claim read
    # but did not take stay locked until its transaction ends, which only makes other workers
    # skip them for that moment. Built once per number of levels, not per call.
    parts = [
        select(_level_query(i, skip_locked=skip_locked).subquery(f"l{i}")) for i in range(levels)
    ]
    return DirectStatement(parts[0] if levels == 1 else union_all(*parts))


@functools.lru_cache(maxsize=256)
def due_levels_statement(namespaces: int, nth: int = 1) -> DirectStatement:
    # A recursive skip scan, for every claimable state and namespace: the highest priority
    # present, then the next one below it, ... each one probe of the claim index; then, per
    # level, its first due step (``first``) and its ``nth``. Spelled in SQL: SQLAlchemy's
    # recursive CTEs cannot say "the next value below" as a scalar subquery of the recursive
    # term. Paused namespaces and templates (``duplex.storage.pauses``) are left out here as in
    # ``_level_query``, so a level whose first due steps are paused still yields the steps
    # behind them. How PostgreSQL must not plan it, each seen on a table of a few thousand
    # steps, with or without statistics:
    # - "has a due step" as EXISTS became a hash join over every step ready in the past,
    #   whatever its state, and an unordered LIMIT 1 a sequential scan: it is the first due
    #   step in index order, read once per level (the ``due`` CTE) and reused as its nth when
    #   nth is 1;
    # - the paused templates' tasks, a subquery per level, were costed as a read of ``tasks``
    #   per level of the 200 it expects, enough to compile the statement (JIT) at every call:
    #   they are read once (``paused_tasks``);
    # - with the offset of the nth step bound, or ``now`` compared as a value known to the
    #   planner, the prepared statement's generic plan looked dearer than its custom plans and
    #   every call was planned again (0.3-0.4 ms, more than running it): the offset is written
    #   in, and ``now`` is read by a subquery, which no plan knows the value of, so the generic
    #   plan costs what a custom one does. Every read of the index stays a range up to now.
    if nth < 1:
        raise ValueError(f"nth is counted from 1, got {nth}")
    pairs = " UNION ALL ".join(
        f"SELECT '{state}' AS state, CAST(:n{i} AS VARCHAR(255)) AS namespace"
        for state in CLAIMABLE
        for i in range(namespaces)
    )
    due_steps_of_level = """FROM workflow_steps AS w
            WHERE w.state = {level}.state AND w.namespace = {level}.namespace
              AND w.priority = {level}.priority AND w.next_attempt_at <= (SELECT :now)
              AND w.task_uuid NOT IN (SELECT task_uuid FROM paused_tasks)
            ORDER BY w.next_attempt_at"""
    nth_step = (
        "due.first"
        if nth == 1
        else f"(SELECT w.next_attempt_at {due_steps_of_level.format(level='due')}"
        f" LIMIT 1 OFFSET {nth - 1:d})"
    )
    sql = f"""
WITH RECURSIVE pairs(state, namespace) AS ({pairs}),
levels(state, namespace, priority) AS (
    SELECT pairs.state, pairs.namespace,
           (SELECT max(w.priority) FROM workflow_steps AS w
            WHERE w.state = pairs.state AND w.namespace = pairs.namespace
              AND w.priority > {PRIORITY_FLOOR:d})
    FROM pairs
    WHERE pairs.namespace NOT IN (SELECT name FROM pauses WHERE kind = 'namespace')
    UNION ALL
    SELECT levels.state, levels.namespace,
           (SELECT max(w.priority) FROM workflow_steps AS w
            WHERE w.state = levels.state AND w.namespace = levels.namespace
              AND w.priority > {PRIORITY_FLOOR:d} AND w.priority < levels.priority)
    FROM levels WHERE levels.priority IS NOT NULL
),
paused_tasks(task_uuid) AS MATERIALIZED ({_TASKS_OF_PAUSED_TEMPLATES}),
due(state, namespace, priority, first) AS MATERIALIZED (
    SELECT levels.state, levels.namespace, levels.priority,
           (SELECT w.next_attempt_at {due_steps_of_level.format(level="levels")} LIMIT 1)
    FROM levels WHERE levels.priority IS NOT NULL
)
SELECT due.state, due.namespace, due.priority, {nth_step} AS nth
FROM due
WHERE due.first IS NOT NULL
ORDER BY due.state, due.priority DESC
"""
    return DirectStatement(
        text(sql)
        .bindparams(
            bindparam("now", type_=ws.c.next_attempt_at.type),
        )
        .columns(
            column("state", String()),
            column("namespace", String()),
            column("priority", Integer()),
            column("nth", ws.c.next_attempt_at.type),
        )
    )
