"""The reads every hop of a chain makes stay a few rows, whatever the size of the task.

A claim reads the parents of the steps it claims, and a commit probes the states of the task.
On a task written moments ago (PostgreSQL has no statistics of it yet), a plan that walks the
task's steps instead of the index made for the read cost 2-3 ms per commit on a task of 1,600
steps; a prepared statement's generic plan, which knows no parameter values, did so on 400.
Measured here as rows read (``EXPLAIN ANALYZE`` of the generic plan), not as time.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import Connection, select, update

from duplex.clock import utcnow
from duplex.states import COMPLETE, PENDING
from duplex.storage.batch_view import _ITEMS
from duplex.storage.claim_order import due_levels, due_levels_statement
from duplex.storage.db import Database
from duplex.storage.models import workflow_steps
from duplex.storage.readiness import RETURN_PARENTS
from duplex.storage.step_store import _BATCH_PAGE
from duplex.storage.submission import create_task, create_tasks
from duplex.storage.task_state import _DISTINCT_STATES, states_present
from duplex.templates import TaskTemplate

STEPS = 400
# Rows a plan may read from workflow_steps: one probe per state and the parent, with room.
FEW_ROWS = 40


def chain(n: int) -> TaskTemplate:
    steps: list[dict[str, Any]] = [{"name": "s0", "handler": "h"}]
    steps += [{"name": f"s{i}", "handler": "h", "depends_on": [f"s{i - 1}"]} for i in range(1, n)]
    return TaskTemplate.model_validate({"name": "chain", "steps": steps})


def _literal(value: Any) -> str:
    if isinstance(value, list):  # an array: '{a,b}'
        return "'{" + ",".join(f'"{item}"' for item in value) + "}'"
    if isinstance(value, int):
        return str(value)
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return "'" + text.replace("'", "''") + "'"


def rows_read(conn: Connection, statement: Any, params: dict[str, Any], table: str) -> int:
    """Rows the plan of ``statement`` read from ``table`` (all loops), on PostgreSQL.

    The plan is the generic plan of the prepared statement, the one a worker runs once psycopg
    prepares what it runs often: it knows no parameter values, so only the form of the
    statement keeps it on its indexes. An UPDATE's changes are rolled back.
    """
    expanded = statement.compile(dialect=conn.dialect).construct_expanded_state(params)
    names: list[str] = []

    def numbered(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    prepared = re.sub(r"%\((\w+)\)s", numbered, expanded.statement)
    # As literals: EXPLAIN EXECUTE cannot type bound parameters; these take the prepared ones'.
    arguments = ", ".join(_literal(expanded.parameters[name]) for name in names)
    name = f"hop_plan_{uuid.uuid4().hex}"  # never one left behind by a failed read
    conn.exec_driver_sql("SAVEPOINT plan")
    conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
    conn.exec_driver_sql(f"PREPARE {name} AS {prepared}")
    try:
        (plan,) = conn.exec_driver_sql(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {name}({arguments})"
        ).one()
        # Before the rollback: psycopg answers a rollback with DEALLOCATE ALL when it has
        # prepared statements of its own.
        conn.exec_driver_sql(f"DEALLOCATE {name}")
    finally:
        conn.exec_driver_sql("ROLLBACK TO SAVEPOINT plan")
    nodes = plan if isinstance(plan, list) else json.loads(plan)

    def walk(node: dict[str, Any]) -> int:
        own = 0
        if node.get("Relation Name") == table:
            removed = node.get("Rows Removed by Filter", 0)
            own = (node["Actual Rows"] + removed) * node["Actual Loops"]
        return own + sum(walk(child) for child in node.get("Plans", []))

    return walk(nodes[0]["Plan"])


def test_a_commit_reads_few_rows_of_a_large_task_without_statistics(
    postgres_db: Database,
) -> None:
    with postgres_db.write() as conn:
        task = create_task(conn, chain(STEPS), {}, now=utcnow())
        # The first half ran: its steps are complete, the rest pending.
        names = [f"s{i}" for i in range(STEPS // 2 + 1)]
        conn.execute(
            update(workflow_steps).where(workflow_steps.c.name.in_(names)).values(state=COMPLETE)
        )
    with postgres_db.read() as conn:
        ids = dict(conn.execute(select(workflow_steps.c.name, workflow_steps.c.step_uuid)).all())
        following = ids[f"s{STEPS // 2 + 1}"]
        # The claim's RETURNING reads the parents of the row it claimed, as this select does.
        read_parents = select(RETURN_PARENTS["postgresql"]).where(
            workflow_steps.c.step_uuid == following
        )
        parents = rows_read(conn, read_parents, {}, "workflow_steps")
        probes = rows_read(conn, _DISTINCT_STATES.statement, {"ids": [task]}, "workflow_steps")
        present = states_present(conn, [task])
    assert parents <= FEW_ROWS, f"the parents' read went through {parents} steps"
    assert present == {task: {COMPLETE: 1, PENDING: 1}}
    assert probes <= FEW_ROWS, f"the state probes went through {probes} steps"


TASKS = 500


@pytest.mark.parametrize("analyzed", [False, True], ids=["no_statistics", "stale_statistics"])
def test_the_state_probes_of_a_task_read_its_steps_not_every_step_in_a_state(
    postgres_db: Database, analyzed: bool
) -> None:
    with postgres_db.write() as conn:
        ids = [create_task(conn, chain(2), {}, now=utcnow()) for _ in range(TASKS)]
    if analyzed:  # statistics taken while no step was complete: "complete" looks rare
        with postgres_db.write() as conn:
            conn.exec_driver_sql("ANALYZE workflow_steps")
    with postgres_db.write() as conn:
        conn.execute(update(workflow_steps).values(state=COMPLETE))
    with postgres_db.read() as conn:
        probes = rows_read(
            conn, _DISTINCT_STATES.statement, {"ids": [ids[0], ids[-1]]}, "workflow_steps"
        )
        present = states_present(conn, [ids[0], ids[-1]])
    # Two tasks, each: the first state, and that there is no other.
    assert probes <= 4 * 2, f"the state probes went through {probes} steps"
    assert present == {ids[0]: {COMPLETE: 1}, ids[-1]: {COMPLETE: 1}}


@pytest.mark.parametrize("statement", [_BATCH_PAGE, _ITEMS], ids=["batch_results", "item_page"])
def test_a_page_of_batch_items_is_a_range_of_the_items_index(
    sqlite_db: Database, statement: Any
) -> None:
    with sqlite_db.read() as conn:
        compiled = statement.compile(dialect=conn.dialect)
        values = compiled.construct_params(
            {
                "task_uuid": "t",
                "item_prefix": "w[",
                "after": 0,
                "upto": 9,
                "start": 0,
                "position": 1,
                "limit": 10,
            }
        )
        positional = tuple(values[name] for name in compiled.positiontup or ())
        plan = " | ".join(
            row[3]
            for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + compiled.string, positional)
        )
    assert "USING INDEX ix_workflow_steps_task_uuid_item_index" in plan, plan


@pytest.mark.parametrize("analyzed", [False, True], ids=["no_statistics", "statistics"])
def test_the_claim_orders_level_read_keeps_its_plan_once_prepared(
    postgres_db: Database, analyzed: bool
) -> None:
    """The due levels are read at every claim, eager ones included. Prepared, the statement
    must run on its generic plan: planning it cost 0.3-0.4 ms a call, more than running it.
    With the offset of the ``nth`` step bound (without statistics), or ``now`` compared as a
    known value (with them), PostgreSQL costed the generic plan above the custom ones and
    planned every call again."""
    now = utcnow()
    with postgres_db.write() as conn:
        create_tasks(conn, chain(2), [{}] * 200, now=now)
        conn.execute(
            update(workflow_steps).where(workflow_steps.c.name == "s0").values(state=COMPLETE)
        )
        create_tasks(conn, chain(2), [{}] * 5, now=now)
        if analyzed:
            conn.exec_driver_sql("ANALYZE workflow_steps, tasks, pauses")
    with postgres_db.read() as conn:
        # psycopg prepares a text on its sixth run; PostgreSQL plans the first five runs of
        # a prepared statement for their values, then settles on the generic plan if it is
        # no dearer. Sixteen runs each of a claim's read (nth 10) and an eager claim's (nth 1).
        for nth in [1, 10] * 16:
            levels = due_levels(conn, ["default"], now=now, nth=nth)
            assert [(level.state, level.priority) for level in levels] == [("enqueued", 0)]
        plans = conn.exec_driver_sql(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE %(like)s",
            {"like": "%WITH RECURSIVE pairs%"},
        ).all()
    assert len(plans) == 2, plans  # one text per nth
    for generic, custom in plans:
        # Planned for its values five times at most, then always on the generic plan.
        assert custom <= 5, plans
        assert generic > 0, plans


def test_the_claim_orders_level_read_costs_the_same_whatever_the_number_of_tasks(
    postgres_db: Database,
) -> None:
    """The planner's estimate of the due levels' read does not grow with the tasks table
    (1,000 then 10,000 tasks, analyzed), and stays below ``jit_above_cost``, so PostgreSQL
    never compiles it at a claim. The paused templates' tasks, once a subquery per level,
    were costed as a read of ``tasks`` for each of the 200 levels the planner expects:
    240,000 at 20,000 tasks, and the compilation made every claim take 27 ms instead of 0.2."""

    def estimates(conn: Connection) -> list[float]:
        costs = []
        for nth in (1, 16):
            statement: Any = due_levels_statement(1, nth).statement
            compiled = statement.compile(dialect=conn.dialect)
            values = compiled.construct_params({"n0": "default", "now": utcnow()})
            raw = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + compiled.string, values)
            found = raw.scalar_one()
            plan = found if isinstance(found, list) else json.loads(found)
            costs.append(plan[0]["Plan"]["Total Cost"])
        return costs

    with postgres_db.write() as conn:
        create_tasks(conn, chain(1), [{}] * 1_000, now=utcnow())
        conn.exec_driver_sql("ANALYZE workflow_steps, tasks, pauses")
        few = estimates(conn)
    with postgres_db.write() as conn:
        create_tasks(conn, chain(1), [{}] * 9_000, now=utcnow())
        conn.exec_driver_sql("ANALYZE workflow_steps, tasks, pauses")
        many = estimates(conn)
        threshold = float(conn.exec_driver_sql("SHOW jit_above_cost").scalar_one())
    for at_1000, at_10000 in zip(few, many, strict=True):
        assert at_10000 < 1.5 * at_1000, (few, many)
        assert at_10000 < threshold, (many, threshold)
