"""BulkStatement and ColumnInsert write exactly what SQLAlchemy's own executemany writes, on
every backend."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Boolean,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    event,
    insert,
    select,
)
from sqlalchemy import text as sql

from duplex.errors import StorageError
from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.driver import COPY_FROM_ROWS, BulkStatement, ColumnInsert, db_json, db_time
from duplex.storage.models import JSONValue, UTCDateTime
from tests.conftest import postgres_schema_url, require_postgres

metadata = MetaData()
probe = Table(
    "driver_probe",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("via", String(8), nullable=False),
    Column("label", String(32)),
    Column("at", UTCDateTime),
    Column("doc", JSONValue),
    # Not among the rows' columns: an INSERT writes its default.
    Column("n", Integer, nullable=False, default=7),
)
# Every kind of column a submission writes, for ColumnInsert.
wide = Table(
    "driver_wide",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("via", String(8), nullable=False),
    Column("label", String(32)),
    Column("note", Text),
    Column("flag", Boolean),
    Column("count", Integer),
    Column("at", UTCDateTime),
    Column("doc", JSONValue),
)
PROBE_COLUMNS = ("id", "via", "label", "at", "doc")
BULK_INSERT = BulkStatement(
    insert(probe).values(
        {name: bindparam(name, type_=probe.c[name].type) for name in PROBE_COLUMNS}
    ),
    PROBE_COLUMNS,
)
# Every column from the rows: on PostgreSQL this one streams through COPY.
ALL_COLUMNS = (*PROBE_COLUMNS, "n")
BULK_COPY = BulkStatement(
    insert(probe).values({name: bindparam(name, type_=probe.c[name].type) for name in ALL_COLUMNS}),
    ALL_COLUMNS,
)
# A constant in the statement (the literal "bulk") next to row values.
BULK_RELABEL = BulkStatement(
    probe.update()
    .where(probe.c.id == bindparam("b_id"), probe.c.via == "bulk")
    .values(label=bindparam("v_label")),
    ("v_label", "b_id"),
)

VALUES: list[tuple[str | None, datetime | None, Any]] = [
    ("plain", datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC), {"a": 1, "b": [1, 2]}),
    # No microseconds: SQLite compares timestamps as text, so the shape must not change.
    ("whole second", datetime(2026, 12, 1, 10, 0, 1, tzinfo=UTC), {}),
    ("other zone", datetime(2026, 12, 1, 12, 0, 0, 5, tzinfo=timezone(timedelta(hours=2))), []),
    (None, None, None),
    ("unicode ü", datetime(2026, 1, 1, tzinfo=UTC), {"text": "ü \u2603", "n": None}),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        database = Database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'driver.db'}"))
    else:
        require_postgres()
        schema = f"driver_{uuid.uuid4().hex[:12]}"
        _run_public(f'CREATE SCHEMA "{schema}"')
        database = Database(DatabaseSettings(url=postgres_schema_url(schema)))
    with database.write() as conn:
        metadata.create_all(conn)
    yield database
    database.dispose()
    if request.param == "postgresql":
        _run_public(f'DROP SCHEMA "{schema}" CASCADE')


def _run_public(statement: str) -> None:
    setup = Database(DatabaseSettings(url=postgres_schema_url("public")))
    with setup.write() as conn:
        conn.execute(sql(statement))
    setup.dispose()


def _raw(conn: Any, via: str) -> list[tuple[Any, ...]]:
    # Read the stored text itself, not what SQLAlchemy's result types make of it.
    cast = "" if conn.dialect.name == "sqlite" else "::text"
    rows = conn.exec_driver_sql(
        f"SELECT label, at{cast}, doc{cast} FROM driver_probe WHERE via = '{via}' ORDER BY id"
    )
    return [tuple(row) for row in rows]


# One row (one execute), a few (executemany), and enough for COPY on PostgreSQL.
Values = list[tuple[str | None, datetime | None, Any]]
SIZES = [VALUES[:1], VALUES, VALUES * 2]
SIZE_IDS = ["one", "few", "copy"]
assert len(VALUES) < COPY_FROM_ROWS <= len(VALUES) * 2


@pytest.mark.parametrize("values", SIZES, ids=SIZE_IDS)
def test_rows_written_at_the_driver_match_sqlalchemys(db: Database, values: Values) -> None:
    with db.write() as conn:
        conn.execute(
            insert(probe),
            [
                {"id": i, "via": "core", "label": label, "at": at, "doc": doc}
                for i, (label, at, doc) in enumerate(values)
            ],
        )
        rows = [
            (100 + i, "bulk", label, db_time(conn.dialect, at), db_json(doc))
            for i, (label, at, doc) in enumerate(values)
        ]
        assert BULK_INSERT.execute(conn, rows) == len(rows)
    with db.read() as conn:
        assert _raw(conn, "bulk") == _raw(conn, "core")
        typed = conn.execute(select(probe.c.at, probe.c.doc).order_by(probe.c.id)).all()
        defaults = conn.execute(select(probe.c.n).where(probe.c.via == "bulk")).scalars().all()
    assert defaults == [7] * len(values)
    core, bulk = typed[: len(values)], typed[len(values) :]
    assert bulk == core
    assert [doc for _, doc in bulk] == [doc for _, _, doc in values]
    assert [at for at, _ in bulk] == [at for _, at, _ in values]


@pytest.mark.parametrize("values", SIZES, ids=SIZE_IDS)
def test_an_insert_of_every_column_writes_what_sqlalchemy_writes(
    db: Database, values: Values
) -> None:
    with db.write() as conn:
        conn.execute(
            insert(probe),
            [
                {"id": i, "via": "core", "label": label, "at": at, "doc": doc, "n": i}
                for i, (label, at, doc) in enumerate(values)
            ],
        )
        rows = [
            (100 + i, "copy", label, db_time(conn.dialect, at), db_json(doc), i)
            for i, (label, at, doc) in enumerate(values)
        ]
        assert BULK_COPY.execute(conn, rows) == len(rows)
    with db.read() as conn:
        assert _raw(conn, "copy") == _raw(conn, "core")
        typed = conn.execute(select(probe.c.at, probe.c.doc, probe.c.n).order_by(probe.c.id)).all()
    assert typed[len(values) :] == typed[: len(values)]


def test_an_insert_refused_by_the_database_is_a_storage_error(db: Database) -> None:
    row = (1, "copy", None, None, db_json(None), 0)

    def insert_twice() -> None:
        with db.write() as conn:
            BULK_COPY.execute(conn, [row])
            BULK_COPY.execute(conn, [row])  # the same primary key again

    with pytest.raises(StorageError):
        insert_twice()
    with db.read() as conn:
        assert _raw(conn, "copy") == []


def test_constants_of_the_statement_are_kept_and_rowcount_is_summed(db: Database) -> None:
    with db.write() as conn:
        for i, via in enumerate(("bulk", "bulk", "core")):
            conn.execute(insert(probe).values(id=i, via=via, label="old"))
        # Row 2 is not "bulk" and row 9 does not exist: neither matches.
        matched = BULK_RELABEL.execute(conn, [("new", 0), ("new", 1), ("new", 2), ("new", 9)])
    assert matched == 2
    with db.read() as conn:
        labels = conn.execute(select(probe.c.label).order_by(probe.c.id)).scalars().all()
    assert labels == ["new", "new", "old"]


BULK_REWRITE = BulkStatement(
    probe.update()
    .where(probe.c.id == bindparam("b_id"))
    .values(
        label=bindparam("v_label"),
        at=bindparam("v_at", type_=probe.c.at.type),
        doc=bindparam("v_doc", type_=probe.c.doc.type),
    ),
    ("v_label", "v_at", "v_doc", "b_id"),
)


@pytest.mark.parametrize("values", [VALUES, VALUES * 2], ids=["few", "many"])
def test_updated_rows_match_sqlalchemys_updates(db: Database, values: Values) -> None:
    # On PostgreSQL many rows update in one statement, joined to one array per column; fewer
    # than COPY_FROM_ROWS as one plain UPDATE each (lighter for the server than the join).
    statements: list[str] = []
    with db.write() as conn:
        for i, via in enumerate(["core"] * len(values) + ["bulk"] * len(values)):
            conn.execute(insert(probe).values(id=i, via=via, label="old", doc={"old": True}))
        conn.execute(
            probe.update()
            .where(probe.c.id == bindparam("b_id"))
            .values(label=bindparam("v_label"), at=bindparam("v_at"), doc=bindparam("v_doc")),
            [
                {"b_id": i, "v_label": label, "v_at": at, "v_doc": doc}
                for i, (label, at, doc) in enumerate(values)
            ],
        )
        rows = [
            (label, db_time(conn.dialect, at), db_json(doc), len(values) + i)
            for i, (label, at, doc) in enumerate(values)
        ]

        def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            statements.append(statement)

        event.listen(db.engine, "before_cursor_execute", seen)
        try:
            assert BULK_REWRITE.execute(conn, [*rows, ("x", None, "null", 99)]) == len(rows)
        finally:
            event.remove(db.engine, "before_cursor_execute", seen)
    with db.read() as conn:
        assert _raw(conn, "bulk") == _raw(conn, "core")
    joined = len(values) + 1 >= COPY_FROM_ROWS and db.dialect == "postgresql"
    assert [("unnest(" in statement) for statement in statements] == [joined]


# SQLite does not enforce a string column's length: PostgreSQL only.
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.parametrize("count", [1, COPY_FROM_ROWS], ids=["few", "many"])
def test_a_value_longer_than_its_column_is_refused_not_cut(db: Database, count: int) -> None:
    # PostgreSQL refuses it in a plain UPDATE; an array of varchar(32) would cut it to fit.
    with db.write() as conn:
        for i in range(count):
            conn.execute(insert(probe).values(id=i, via="bulk", label="old"))
    rows = [("x" * 40, None, "null", i) for i in range(count)]
    with pytest.raises(StorageError) as refused, db.write() as conn:
        BULK_REWRITE.execute(conn, rows)
    assert refused.value.refused
    with db.read() as conn:
        assert set(conn.execute(select(probe.c.label)).scalars()) == {"old"}


def test_a_parameter_that_is_neither_a_column_nor_a_constant_is_refused(db: Database) -> None:
    statement = BulkStatement(
        probe.update().where(probe.c.id == bindparam("b_id")).values(label=bindparam("v")),
        ("b_id",),
    )
    with db.write() as conn, pytest.raises(ValueError, match="'v' is neither"):
        statement.execute(conn, [(1,)])


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        db_time(Database(DatabaseSettings(url="sqlite://")).engine.dialect, datetime(2026, 1, 1))


WIDE_VALUES: list[dict[str, Any]] = [
    {"label": "plain", "note": "tab\there\nnewline \\ back", "flag": True, "count": 0},
    {"label": None, "note": None, "flag": None, "count": None},
    {"label": "ü \u2603", "note": "", "flag": False, "count": 2**31 - 1},
]


def _wide_rows(via: str, first_id: int) -> list[dict[str, Any]]:
    return [
        {
            "id": first_id + i,
            "via": via,
            **values,
            "at": at,
            "doc": doc,
        }
        for i, (values, (_, at, doc)) in enumerate(zip(WIDE_VALUES * 2, VALUES, strict=False))
    ]


def _wide_raw(conn: Any, via: str) -> list[tuple[Any, ...]]:
    cast = "" if conn.dialect.name == "sqlite" else "::text"
    rows = conn.exec_driver_sql(
        f"SELECT label, note, flag, count, at{cast}, doc{cast} FROM driver_wide"
        f" WHERE via = '{via}' ORDER BY id"
    )
    return [tuple(row) for row in rows]


def test_column_insert_writes_what_sqlalchemy_writes(db: Database) -> None:
    statement = ColumnInsert(wide)
    with db.write() as conn:
        conn.execute(insert(wide), _wide_rows("core", 0))
        statement.execute(conn, _wide_rows("column", 100))
        statement.execute(conn, [])  # nothing to write is not an error
    with db.read() as conn:
        assert _wide_raw(conn, "column") == _wide_raw(conn, "core")
        assert len(_wide_raw(conn, "column")) == len(VALUES)
        typed = conn.execute(select(wide).order_by(wide.c.id)).all()
    core, column = typed[: len(VALUES)], typed[len(VALUES) :]
    assert [row[2:] for row in column] == [row[2:] for row in core]


def test_column_insert_refusals_are_storage_errors_and_roll_back(db: Database) -> None:
    statement = ColumnInsert(wide)
    rows = _wide_rows("column", 0)

    def insert_twice() -> None:
        with db.write() as conn:
            statement.execute(conn, rows[:1])
            statement.execute(conn, rows)  # id 0 again: a primary-key violation

    with pytest.raises(StorageError) as refused:
        insert_twice()
    assert not refused.value.transient  # the same rows would be refused again
    with db.read() as conn:
        assert _wide_raw(conn, "column") == []


def test_column_insert_refuses_naive_datetimes(db: Database) -> None:
    row = {**_wide_rows("column", 0)[0], "at": datetime(2026, 1, 1)}
    with pytest.raises((ValueError, StorageError), match="naive"), db.write() as conn:
        ColumnInsert(wide).execute(conn, [row])


def test_column_insert_takes_the_rows_columns_in_any_order(db: Database) -> None:
    rows = _wide_rows("column", 0)
    reordered = [dict(reversed(list(row.items()))) for row in rows]
    with db.write() as conn:
        conn.execute(insert(wide), _wide_rows("core", 100))
        ColumnInsert(wide).execute(conn, reordered)
    with db.read() as conn:
        assert _wide_raw(conn, "column") == _wide_raw(conn, "core")


def test_column_insert_refuses_unknown_columns_and_unwritten_defaults(db: Database) -> None:
    with db.write() as conn:
        with pytest.raises(ValueError, match=r"not columns of driver_wide: \['colour'\]"):
            ColumnInsert(wide).execute(conn, [{**_wide_rows("column", 0)[0], "colour": "red"}])
        # ``n`` has a Python-side default that neither COPY nor the plain INSERT would write.
        with pytest.raises(ValueError, match=r"Python-side default not given: \['n'\]"):
            ColumnInsert(probe).execute(conn, [{"id": 1, "via": "column"}])
