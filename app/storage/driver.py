"""Statements run many rows at a time at the driver, without SQLAlchemy's per-row work.

A commit of a batch writes a row or more per step: the guarded update, the transition, the
events, the task states. Given a list of dicts, SQLAlchemy builds a parameter dict per row and
runs every type's bind processor on every value, and on a no-op workload that cost more than
the database did. A ``BulkStatement`` is compiled once per dialect and takes rows as tuples
whose values are already what the driver expects: text for UUIDs and strings, ``db_time``
for timestamps, ``db_json`` for JSON. Statements are still written with SQLAlchemy Core, so
each is readable in its module like every other statement.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Dialect
from sqlalchemy.sql.expression import UpdateBase


class BulkStatement:
    """An INSERT or UPDATE run with the driver's ``executemany``.

    ``columns`` names the statement's bind parameters in the order a row gives them; every
    other parameter must be a constant of the statement itself (such as a literal state).
    """

    def __init__(self, statement: UpdateBase, columns: Sequence[str]) -> None:
        self.statement = statement
        self.columns = tuple(columns)
        self._compiled: dict[str, tuple[str, Any]] = {}

    def execute(self, conn: Connection, rows: Sequence[tuple[Any, ...]]) -> int:
        """Run the statement once per row; return the rows it matched, summed."""
        if not rows:
            return 0
        sql, arrange = self._compiled.get(conn.dialect.name) or self._compile(conn.dialect)
        cursor = conn.exec_driver_sql(sql, [arrange(row) for row in rows])
        return int(cursor.rowcount)

    def _compile(self, dialect: Dialect) -> tuple[str, Any]:
        compiled = self.statement.compile(dialect=dialect)
        names = list(compiled.positiontup or ()) if compiled.positional else list(compiled.params)
        constants: dict[str, Any] = {}
        for name in names:
            if name in self.columns:
                continue
            value = compiled.params[name]
            if value is None:
                value = self._column_default(name)
            if value is None:
                raise ValueError(f"bind parameter {name!r} is neither a column nor a constant")
            processor = compiled.binds[name].type.bind_processor(dialect)
            constants[name] = processor(value) if processor else value
        missing = set(self.columns) - set(names)
        if missing:
            raise ValueError(f"columns not in the statement: {sorted(missing)}")
        index = {name: i for i, name in enumerate(self.columns)}
        if compiled.positional:
            slots = [(index.get(name), constants.get(name)) for name in names]

            def arrange(row: tuple[Any, ...]) -> tuple[Any, ...]:
                return tuple(c if i is None else row[i] for i, c in slots)

        else:
            columns = self.columns

            def arrange(row: tuple[Any, ...]) -> dict[str, Any]:  # type: ignore[misc]
                return {**constants, **dict(zip(columns, row, strict=True))}

        self._compiled[dialect.name] = (compiled.string, arrange)
        return compiled.string, arrange

    def _column_default(self, name: str) -> Any:
        """An INSERT renders a column's scalar default as a parameter of its own."""
        table = getattr(self.statement, "table", None)
        column = table.c.get(name) if table is not None else None
        default = column.default if column is not None else None
        return default.arg if default is not None and default.is_scalar else None


def db_time(dialect: Dialect, value: datetime | None) -> Any:
    """A UTC timestamp as the driver stores it (see ``app.models.UTCDateTime``).

    SQLite compares timestamps as text, so the text has one shape, always with microseconds,
    the shape SQLAlchemy's SQLite DATETIME writes and reads.
    """
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    if dialect.name == "sqlite":
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def db_json(value: Any) -> str:
    """A JSON value as the driver stores it: encoded once, ``None`` as JSON ``null``.

    That is what SQLAlchemy's JSON type writes for ``None`` (``none_as_null`` is off).
    """
    return json.dumps(value)
