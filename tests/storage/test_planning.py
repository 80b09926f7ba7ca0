"""Statement forms that keep their plan without statistics (``duplex.storage.planning``)."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite

from duplex.storage.models import workflow_step_edges, workflow_steps
from duplex.storage.planning import InValuesOf

CHILDREN = select(workflow_step_edges.c.to_step_uuid).where(
    workflow_step_edges.c.from_step_uuid == "parent"
)
STATEMENT = (
    update(workflow_steps)
    .where(InValuesOf(workflow_steps.c.step_uuid, CHILDREN), workflow_steps.c.state == "pending")
    .values(state="enqueued")
)


def test_postgresql_filters_by_the_array_of_the_query() -> None:
    sql = " ".join(str(STATEMENT.compile(dialect=postgresql.dialect())).split())
    assert "workflow_steps.step_uuid = ANY(ARRAY(SELECT workflow_step_edges.to_step_uuid" in sql


def test_sqlite_keeps_in_as_a_plain_condition() -> None:
    sql = " ".join(str(STATEMENT.compile(dialect=sqlite.dialect())).split())
    assert "workflow_steps.step_uuid IN (SELECT workflow_step_edges.to_step_uuid" in sql
    assert "= 1" not in sql  # a condition as it is, not compared with true


def test_statements_built_on_it_are_cached_by_their_parts() -> None:
    other = select(workflow_step_edges.c.from_step_uuid).where(
        workflow_step_edges.c.to_step_uuid == "child"
    )
    same = InValuesOf(workflow_steps.c.step_uuid, CHILDREN)
    assert (
        same._generate_cache_key()
        == InValuesOf(workflow_steps.c.step_uuid, CHILDREN)._generate_cache_key()
    )
    assert (
        same._generate_cache_key()
        != InValuesOf(workflow_steps.c.step_uuid, other)._generate_cache_key()
    )
