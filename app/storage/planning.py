"""Statement forms whose plans do not depend on what the planner knows of the tables.

A table written moments ago has no statistics until it is analysed (autovacuum may be off, or
not have come round yet), and a prepared statement's generic plan knows no parameter values:
a condition that lets the planner start from the wrong side can then cost a scan of every
step on each commit. The forms here leave it one way to go.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, ColumnElement, Select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.visitors import InternalTraversal, _TraverseInternalsType


class InValuesOf(ColumnElement[bool]):
    """``column IN (query)``; on PostgreSQL ``column = ANY(ARRAY(query))``.

    PostgreSQL runs the ARRAY first, once (an InitPlan), and filters the statement's rows by
    its values. As ``IN``, the planner may join the other way round, and without statistics of
    a table written moments ago (its row estimate for ``state = 'pending'`` is 1), a prepared
    statement's generic plan did: every pending step of the table, probed one by one.
    """

    inherit_cache = True
    type = Boolean()
    _is_implicitly_boolean = True  # a condition as it is, not ``(...) = 1`` on SQLite
    _traverse_internals: _TraverseInternalsType = [
        ("column", InternalTraversal.dp_clauseelement),
        ("query", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: ColumnElement[Any], query: Select[Any]) -> None:
        self.column = column
        self.query = query


@compiles(InValuesOf)
def _in_values_of(element: InValuesOf, compiler: SQLCompiler, **kw: Any) -> str:
    column, query = compiler.process(element.column, **kw), compiler.process(element.query, **kw)
    return f"{column} IN ({query})"


@compiles(InValuesOf, "postgresql")
def _any_of_array(element: InValuesOf, compiler: SQLCompiler, **kw: Any) -> str:
    column, query = compiler.process(element.column, **kw), compiler.process(element.query, **kw)
    return f"{column} = ANY(ARRAY({query}))"
