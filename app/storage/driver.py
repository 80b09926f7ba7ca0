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
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from functools import lru_cache, partial
from typing import Any, NamedTuple

from sqlalchemy import JSON, Connection, Dialect, Table, bindparam, func, insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.expression import Insert, Update, UpdateBase
from sqlalchemy.sql.visitors import replacement_traverse

from duplex.storage.direct import array_of, run_at_driver
from duplex.storage.models import UTCDateTime


class _Compiled(NamedTuple):
    sql: str
    # "executemany"; on PostgreSQL "copy" for an INSERT and "arrays" for an UPDATE
    mode: str
    arrange: Callable[[tuple[Any, ...]], Any] | None = None  # None: rows go as given
    constants: dict[str, Any] | None = None  # "arrays": the statement's own parameters
    few: _Compiled | None = None  # the plain statement that a few rows take instead


# Fewer rows than this go to PostgreSQL as one INSERT or UPDATE each (psycopg pipelines them)
# instead of through COPY, which costs a round trip more, or an UPDATE joined to arrays, which
# costs the server more than a plain one (a chain's hop: one result, 0.33 against 0.18 ms).
COPY_FROM_ROWS = 8


class BulkStatement:
    """An INSERT or UPDATE of many rows in one call, without SQLAlchemy's per-row work.

    On SQLite it is the driver's ``executemany`` (one row: ``execute``). On PostgreSQL, where
    each statement of an executemany costs the server a parse, bind and execute of its own, an
    INSERT of ``COPY_FROM_ROWS`` rows or more streams through ``COPY``, and an UPDATE of as
    many runs once for all rows, joined to the rows given as one array per column (``UPDATE …
    FROM unnest(…)``; fewer rows: as on SQLite); its row count is what the executemany's would
    sum to, as long as no two rows update the same row.

    ``columns`` names the statement's bind parameters in the order a row gives them; every
    other parameter must be a constant of the statement itself (such as a literal state).
    """

    def __init__(self, statement: UpdateBase, columns: Sequence[str]) -> None:
        self.statement = statement
        self.columns = tuple(columns)
        self._compiled: dict[str, _Compiled] = {}

    def execute(self, conn: Connection, rows: Sequence[tuple[Any, ...]]) -> int:
        """Run the statement once per row; return the rows it matched, summed."""
        if not rows:
            return 0
        compiled = self._compiled.get(conn.dialect.name) or self._compile(conn.dialect)
        if compiled.mode == "arrays" and len(rows) >= COPY_FROM_ROWS:
            arrays = {name: [row[i] for row in rows] for i, name in enumerate(self.columns)}
            params = {**(compiled.constants or {}), **arrays}
            return run_at_driver(conn, compiled.sql, params)[1]
        if compiled.few is not None and len(rows) < COPY_FROM_ROWS:
            compiled = compiled.few
        arranged = rows if compiled.arrange is None else [compiled.arrange(row) for row in rows]
        if compiled.mode == "copy":
            copy_rows(conn, compiled.sql, arranged)
            return len(rows)
        # One row is one execute: an executemany of one costs psycopg a pipeline of its own.
        if len(arranged) == 1:
            return run_at_driver(conn, compiled.sql, arranged[0])[1]
        return run_at_driver(conn, compiled.sql, arranged, many=True)[1]

    def _compile(self, dialect: Dialect) -> _Compiled:
        compiled = self.statement.compile(dialect=dialect)
        names = list(compiled.positiontup or ()) if compiled.positional else list(compiled.params)
        constants = self._constants(dialect, compiled, names)
        missing = set(self.columns) - set(names)
        if missing:
            raise ValueError(f"columns not in the statement: {sorted(missing)}")
        few = self._executemany(compiled, names, constants)
        result = (
            self._streamed(dialect, names, constants, few)
            or self._joined_to_arrays(dialect, compiled, few)
            or few
        )
        self._compiled[dialect.name] = result
        return result

    def _constants(self, dialect: Dialect, compiled: Any, names: list[str]) -> dict[str, Any]:
        """The statement's own parameters, in the driver's form."""
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
        return constants

    def _joined_to_arrays(
        self, dialect: Dialect, compiled: Any, few: _Compiled
    ) -> _Compiled | None:
        """An UPDATE on PostgreSQL: every row parameter becomes a column of
        ``unnest(array per column) AS bulk_rows(...)``, which the statement is joined to."""
        if dialect.name != "postgresql" or not isinstance(self.statement, Update):
            return None
        types = [array_of(compiled.binds[name].type) for name in self.columns]
        if None in types:
            return None  # a row value that cannot be an array item: one UPDATE per row
        arrays = [bindparam(name, type_=t) for name, t in zip(self.columns, types, strict=True)]
        given = func.unnest(*arrays).table_valued(*self.columns).render_derived().alias("bulk_rows")

        def from_rows(element: Any) -> Any:
            if isinstance(element, BindParameter) and element.key in self.columns:
                return given.c[element.key]
            return None

        # An Update is traversible, though the stubs' overloads do not say so.
        joined = replacement_traverse(self.statement, {}, from_rows)  # type: ignore[call-overload]
        joined = joined.compile(dialect=dialect)
        names = list(joined.params)
        constants = self._constants(dialect, joined, names)
        return _Compiled(joined.string, "arrays", constants=constants, few=few)

    def _streamed(
        self, dialect: Dialect, names: list[str], constants: dict[str, Any], few: _Compiled
    ) -> _Compiled | None:
        """COPY for a plain INSERT on PostgreSQL: no RETURNING, every parameter a column's."""
        statement, table = self.statement, getattr(self.statement, "table", None)
        if (
            dialect.name != "postgresql"
            or not isinstance(statement, Insert)
            or not isinstance(table, Table)
            or statement.returning_column_descriptions
            or not set(names) <= set(table.c.keys())
        ):
            return None
        sql = copy_statement(dialect, table, (*self.columns, *constants))
        if not constants:
            return _Compiled(sql, "copy", few=few)
        tail = tuple(constants.values())
        return _Compiled(sql, "copy", lambda row: (*row, *tail), few=few)

    def _executemany(self, compiled: Any, names: list[str], constants: dict[str, Any]) -> _Compiled:
        index = {name: i for i, name in enumerate(self.columns)}
        if compiled.positional:
            slots = [(index.get(name), constants.get(name)) for name in names]

            def arrange(row: tuple[Any, ...]) -> Any:
                return tuple(c if i is None else row[i] for i, c in slots)

        else:
            columns = self.columns

            def arrange(row: tuple[Any, ...]) -> Any:
                return {**constants, **dict(zip(columns, row, strict=True))}

        return _Compiled(compiled.string, "executemany", arrange)

    def _column_default(self, name: str) -> Any:
        """An INSERT renders a column's scalar default as a parameter of its own."""
        table = getattr(self.statement, "table", None)
        column = table.c.get(name) if table is not None else None
        default = column.default if column is not None else None
        return default.arg if default is not None and default.is_scalar else None


class ColumnInsert:
    """Many rows into one table, given as dicts, with values converted per column.

    The rows go through a ``BulkStatement`` of the INSERT of their columns (``COPY`` on
    PostgreSQL, the driver's ``executemany`` on SQLite); this converts their values once per
    column type (JSON encoded, timestamps checked for a zone) on the way, rather than
    through SQLAlchemy's parameter dicts and bind processors.

    A column with a Python-side default must be given in every row, so that what is written
    never depends on which columns a caller happened to name.
    """

    def __init__(self, table: Table) -> None:
        self.table = table
        # the rows' columns -> the statement and the order it takes them in
        self._statements: dict[frozenset[str], tuple[BulkStatement, tuple[str, ...]]] = {}

    def execute(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Insert ``rows``, dicts that all name the same columns."""
        if not rows:
            return
        given = frozenset(rows[0])
        statement, names = self._statements.get(given) or self._statement(given)
        statement.execute(conn, list(self._values(conn.dialect, names, rows)))

    def _values(
        self, dialect: Dialect, names: tuple[str, ...], rows: Sequence[dict[str, Any]]
    ) -> Iterator[tuple[Any, ...]]:
        converters = [self._converter(dialect, name) for name in names]
        for row in rows:
            yield tuple(
                value if convert is None else convert(value)
                for convert, value in zip(converters, [row[name] for name in names], strict=True)
            )

    def _converter(self, dialect: Dialect, name: str) -> Callable[[Any], Any] | None:
        column_type = self.table.c[name].type
        if isinstance(column_type, JSON):
            return db_json
        if isinstance(column_type, UTCDateTime):  # checked for a zone, one shape on SQLite
            # The rows of one submission share their timestamps: convert each once.
            return lru_cache(maxsize=8)(partial(db_time, dialect))
        # Any other type converts as SQLAlchemy would (None for text, numbers, booleans).
        processor: Callable[[Any], Any] | None = column_type.bind_processor(dialect)
        return processor

    def _statement(self, given: frozenset[str]) -> tuple[BulkStatement, tuple[str, ...]]:
        unknown = sorted(given - set(self.table.c.keys()))
        if unknown:
            raise ValueError(f"not columns of {self.table.name}: {unknown}")
        defaulted = [
            column.name
            for column in self.table.c
            if column.default is not None and column.name not in given
        ]
        if defaulted:
            raise ValueError(f"columns with a Python-side default not given: {defaulted}")
        names = tuple(column.name for column in self.table.c if column.name in given)
        values = {name: bindparam(name, type_=self.table.c[name].type) for name in names}
        entry = (BulkStatement(insert(self.table).values(values), names), names)
        self._statements[given] = entry
        return entry


def copy_statement(dialect: Dialect, table: Table, columns: Sequence[str]) -> str:
    """``COPY table (columns) FROM STDIN`` for PostgreSQL."""
    quote = dialect.identifier_preparer.quote
    return (
        f"COPY {dialect.identifier_preparer.format_table(table)}"
        f" ({', '.join(quote(name) for name in columns)}) FROM STDIN"
    )


def copy_rows(conn: Connection, sql: str, rows: Iterable[Sequence[Any]]) -> None:
    """Stream ``rows`` (values in the driver's form) through a ``COPY ... FROM STDIN``."""
    dialect = conn.dialect
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy(sql) as copy:
            for row in rows:
                copy.write_row(row)
    except dialect.loaded_dbapi.Error as exc:
        # What SQLAlchemy raises for a statement it runs, so callers see one kind of error.
        raise DBAPIError.instance(
            sql, None, exc, dialect.loaded_dbapi.Error, dialect=dialect
        ) from exc
    finally:
        cursor.close()


def db_time(dialect: Dialect, value: datetime | None) -> Any:
    """A UTC timestamp as the driver stores it (see ``duplex.storage.models.UTCDateTime``).

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
