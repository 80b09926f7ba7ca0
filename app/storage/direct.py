"""Statements run straight at the driver: compiled once, without SQLAlchemy's work per call.

A transaction on the hot path (a chain's hop commits a result, makes its dependent ready and
claims it) runs about ten statements, each reading or writing a row or two. Through
``Connection.execute`` a cached Core statement cost 30-45 µs of Python per call (its IN lists
rendered again, its parameters and its result's metadata built), more than SQLite took to
run it. A ``DirectStatement`` is compiled once per dialect, and once per length of each IN
list (``expanding`` parameter); a call converts the values given with the bind processors
found then, runs the SQL at the driver (``run_at_driver``), and converts each row with the
result processors found then. Statements are still written with SQLAlchemy Core, so each is
readable in its module like every other statement.

On PostgreSQL, lists of other lengths than one are sent as one array each (``IN`` becomes
``= ANY(:name)``, ``NOT IN`` ``<> ALL(:name)``): as IN lists, each length of a batch was a
statement text of its own, parsed and planned at every run and never prepared (planning was
8% of the server's CPU in a run of 5,000 single-step tasks). A list of one value keeps
``IN (:value)``, which the planner makes ``= :value``: with an array of one, PostgreSQL
planned the hop's readiness update and event sequence read at every run (its generic plan
assumes an array of several values), and its lock read ran in 58 µs instead of 25.
"""

from __future__ import annotations

import copy
import functools
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    Connection,
    Dialect,
    Float,
    Numeric,
    String,
    Tuple,
    TypeDecorator,
    all_,
    any_,
    bindparam,
)
from sqlalchemy.exc import StatementError
from sqlalchemy.sql import operators
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import BinaryExpression, BindParameter
from sqlalchemy.sql.visitors import ExternallyTraversible, iterate, replacement_traverse
from sqlalchemy.types import ARRAY, TypeEngine

Processor = Callable[[Any], Any] | None
# A kind of dialect (name, driver, parameter style) and the form of the IN lists: LISTS, a
# placeholder per value; ARRAYS, one array parameter per list.
Kind = tuple[str, str, str, str]
LISTS, ARRAYS = "lists", "arrays"
# Shapes (lengths of the IN lists) kept compiled per statement.
SHAPES_KEPT = 64


class _Prepared(NamedTuple):
    sql: str
    arrange: Callable[[Mapping[str, Any]], Any]  # the caller's values -> the driver's parameters
    row: Callable[[Sequence[Any]], Any]  # a driver row -> a row of converted values


class _Compiled(NamedTuple):
    dialect: Dialect  # the first one seen of its kind
    compiled: Any  # SQLAlchemy's compiled statement
    expanding: tuple[str, ...]  # the IN lists a caller gives, by name
    required: frozenset[str]  # every parameter a caller gives


class DirectStatement:
    """A Core statement run at the driver: ``rows`` for what it returns, ``rowcount`` for what
    it matched. Parameters are given by name, as to ``Connection.execute``; a list for an
    ``expanding`` one. Rows are named tuples of the statement's columns (or its RETURNING's),
    their values converted as SQLAlchemy converts them.

    Only the statement's own parameters without a value are given by a caller: a value for
    one of its constants, or for a column it does not write, is refused (SQLAlchemy would
    use them), and so are result columns whose conversion depends on the driver's type code
    (``Numeric``, ``Float``)."""

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        columns = list(getattr(statement, "exported_columns", ()))
        odd = [column.key for column in columns if isinstance(column.type, (Numeric, Float))]
        if odd:
            raise ValueError(f"columns converted by the driver's type code: {odd}")
        self._columns = columns
        self._row_type: Any = namedtuple(  # type: ignore[misc]
            "Row", [column.key for column in columns], rename=True
        )
        self._compiled: dict[Kind, _Compiled] = {}
        self._arrays = _with_arrays(statement)
        # The shapes used lately (thread-safe): a batch's IN lists take any length up to its
        # size, and each length is a statement of its own.
        self._shape = functools.lru_cache(maxsize=SHAPES_KEPT)(self._expand)

    def rows(self, conn: Connection, params: Mapping[str, Any] | None = None) -> list[Any]:
        """Run the statement; return its rows."""
        prepared, driver_params = self._prepare(conn.dialect, params or {})
        rows, _ = run_at_driver(conn, prepared.sql, driver_params)
        return [prepared.row(row) for row in rows]

    def rowcount(self, conn: Connection, params: Mapping[str, Any] | None = None) -> int:
        """Run the statement; return how many rows it matched."""
        prepared, driver_params = self._prepare(conn.dialect, params or {})
        _, count = run_at_driver(conn, prepared.sql, driver_params)
        return count

    def _prepare(self, dialect: Dialect, params: Mapping[str, Any]) -> tuple[_Prepared, Any]:
        kind: Kind = (dialect.name, dialect.driver, dialect.paramstyle, LISTS)
        compiled = self._compiled.get(kind) or self._compile(kind, dialect, self.statement)
        if not params.keys() <= compiled.required:
            unknown = sorted(set(params) - compiled.required)
            raise ValueError(f"not parameters a caller gives to this statement: {unknown}")
        lengths = tuple(len(params[name]) for name in compiled.expanding)
        if self._arrays is not None and dialect.name == "postgresql" and set(lengths) != {1}:
            kind, lengths = (*kind[:3], ARRAYS), ()
            if kind not in self._compiled:
                self._compile(kind, dialect, self._arrays)
        prepared: _Prepared = self._shape(kind, lengths)
        try:
            return prepared, prepared.arrange(params)
        except (TypeError, ValueError) as exc:
            # As SQLAlchemy reports a value it cannot convert (a StorageError that says the
            # data was refused), not as a bare exception from a bind processor.
            raise StatementError(str(exc), prepared.sql, dict(params), exc) from exc

    def _compile(self, kind: Kind, dialect: Dialect, statement: Executable) -> _Compiled:
        compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
        if any(bind.literal_execute for bind in compiled.binds.values()):
            raise ValueError("a literal_execute parameter is rendered per call: not supported")
        required = frozenset(name for name, bind in compiled.binds.items() if bind.required)
        # The IN lists the caller gives (a list of constants has its one length).
        expanding = tuple(sorted(name for name in required if compiled.binds[name].expanding))
        entry = _Compiled(dialect, compiled, expanding, required)
        self._compiled[kind] = entry
        return entry

    def _expand(self, kind: Kind, lengths: tuple[int, ...]) -> _Prepared:
        """The SQL and the conversions for IN lists of these ``lengths``."""
        dialect, compiled, expanding, required = self._compiled[kind]
        # Placeholders: only the lists' lengths shape the SQL.
        shape: dict[str, Any] = dict.fromkeys(required)
        shape.update({name: [None] * n for name, n in zip(expanding, lengths, strict=True)})
        state = compiled.construct_expanded_state(shape)
        origin = {name: name for name in state.parameters}
        for name, expanded in (state.parameter_expansion or {}).items():
            origin.update({part: name for part in expanded})
        names = list(state.positiontup) if compiled.positional else list(state.parameters)
        # Per driver parameter: the caller's value (an IN list's item by its index), or the
        # statement's own constant, converted once here.
        sources: list[tuple[str, int | None, Processor, Any]] = []
        for name in names:
            source = origin[name]
            bind = compiled.binds[source]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if not bind.required:
                value = state.parameters[name]
                sources.append(("", None, None, processor(value) if processor else value))
                continue
            index = None
            if bind.expanding:
                index = (state.parameter_expansion or {})[source].index(name)
            sources.append((source, index, processor, None))

        def values(given: Mapping[str, Any]) -> list[Any]:
            out = []
            for source, index, processor, constant in sources:
                if not source:
                    out.append(constant)
                    continue
                value = given[source] if index is None else given[source][index]
                out.append(value if processor is None else processor(value))
            return out

        if compiled.positional:

            def arrange(given: Mapping[str, Any]) -> Any:
                return tuple(values(given))

        else:

            def arrange(given: Mapping[str, Any]) -> Any:
                return dict(zip(names, values(given), strict=True))

        return _Prepared(state.statement, arrange, self._row_converter(dialect))

    def _row_converter(self, dialect: Dialect) -> Callable[[Sequence[Any]], Any]:
        processors = [
            column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in self._columns
        ]
        row_type = self._row_type
        if not any(processors):
            make: Callable[[Sequence[Any]], Any] = row_type._make
            return make

        def convert(row: Sequence[Any]) -> Any:
            return row_type._make(
                [value if p is None else p(value) for p, value in zip(processors, row, strict=True)]
            )

        return convert


def _with_arrays(statement: Executable) -> Executable | None:
    """``statement`` with each IN list of a caller's values as one array parameter, or None
    when it has none, or has one that cannot be: ``column IN (:name)`` as ``column =
    ANY(:name)``, and ``NOT IN`` as ``<> ALL``, which mean the same for every list, an empty
    one and NULLs included."""
    found = False

    def replace(element: ExternallyTraversible, **_: Any) -> ExternallyTraversible | None:
        nonlocal found
        if not (
            isinstance(element, BinaryExpression)
            and isinstance(element.right, BindParameter)
            and element.right.expanding
            and element.right.required  # a list of the statement's own stays as it is
            and element.operator in _ARRAY_FORMS
            and not isinstance(element.left, Tuple)
        ):
            return None
        array_type = array_of(element.right.type)
        if array_type is None:
            return None
        found = True
        array = bindparam(element.right.key, type_=array_type)
        converted: ExternallyTraversible = _ARRAY_FORMS[element.operator](element.left, array)
        return converted

    arrays = replacement_traverse(cast(ExternallyTraversible, statement), {}, replace)
    lists_left = any(
        isinstance(node, BindParameter) and node.expanding and node.required
        for node in iterate(arrays)
    )
    return cast(Executable, arrays) if found and not lists_left else None


_ARRAY_FORMS: dict[Any, Callable[[Any, Any], Any]] = {
    operators.in_op: lambda column, array: column == any_(array),
    operators.not_in_op: lambda column, array: column != all_(array),
}


def array_of(type_: TypeEngine[Any]) -> ARRAY[Any] | None:
    """The type of a PostgreSQL array of ``type_``'s values, None for one that cannot be.

    PostgreSQL truncates a value cast to ``varchar(n)``, an array's items too (``'abcd' IN
    (:v)`` compares 'abcd', ``= ANY(:v::varchar(3)[])`` 'abc'; an UPDATE from such an array
    writes 'abc' where a plain one refuses 'abcd'): a sized string loses its size, and a
    decorated one cannot be an array. A type that says nothing cannot be cast."""
    if type_._isnull:
        return None
    if isinstance(type_, TypeDecorator):
        impl = type_.impl_instance
        return None if isinstance(impl, String) and impl.length else ARRAY(type_)
    if isinstance(type_, String) and type_.length:
        unsized = copy.copy(type_)
        unsized.length = None
        return ARRAY(unsized)
    return ARRAY(type_)


def run_at_driver(
    conn: Connection, sql: str, params: Any, *, many: bool = False
) -> tuple[list[Sequence[Any]], int]:
    """Run ``sql`` with parameters in the driver's form; return its rows and its row count.

    Straight on the driver's cursor: through ``exec_driver_sql`` a statement cost 20-40 µs
    more, and a PostgreSQL hop runs about ten. A driver error goes to SQLAlchemy's own
    handling of it, as from ``exec_driver_sql``: raised as the ``DBAPIError`` it would raise,
    and a lost connection invalidated with the pool's older ones. Wherever something listens
    to the engine's cursor or error events (tracing, fault injection), statements go through
    ``exec_driver_sql``: the listeners get what SQLAlchemy gives them.
    """
    if _watched(conn):
        result = conn.exec_driver_sql(sql, params)
        rows: list[Sequence[Any]] = list(result.fetchall()) if result.returns_rows else []
        return rows, int(result.rowcount)
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        if many:
            cursor.executemany(sql, params)
        else:
            cursor.execute(sql, params)
        found = list(cursor.fetchall()) if cursor.description is not None else []
        return found, int(cursor.rowcount)
    except conn.dialect.loaded_dbapi.Error as exc:
        # SQLAlchemy's handler (private, the one ``exec_driver_sql`` calls): it wraps the
        # error, tells a lost connection (``is_disconnect``) and invalidates it and the pool.
        conn._handle_dbapi_exception(exc, sql, params, cursor, None)
    finally:
        cursor.close()


def _watched(conn: Connection) -> bool:
    events = conn.dispatch
    return bool(
        events.before_cursor_execute
        or events.after_cursor_execute
        or conn.dialect.dispatch.handle_error  # where SQLAlchemy keeps the engine's listeners
    )
