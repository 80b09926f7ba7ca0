"""DirectStatement reads and writes exactly what SQLAlchemy's own execution does, on every
backend: the same rows, values converted the same way, the same row counts, the same errors."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Connection,
    Float,
    Integer,
    String,
    TypeDecorator,
    bindparam,
    cast,
    column,
    event,
    literal,
    literal_column,
    select,
    text,
    update,
)

from duplex.clock import utcnow
from duplex.errors import StorageError
from duplex.settings import DatabaseSettings
from duplex.states import COMPLETE, ENQUEUED, PENDING
from duplex.storage.claim_order import due_levels_statement, ready_statement
from duplex.storage.claims import _CLAIM
from duplex.storage.db import Database
from duplex.storage.direct import SHAPES_KEPT, DirectStatement
from duplex.storage.migrate import upgrade_to_head
from duplex.storage.models import UTCDateTime, pauses, tasks, workflow_steps
from duplex.storage.outbox import _LAST_SEQUENCES
from duplex.storage.readiness import _ENQUEUE_READY, parents_of
from duplex.storage.results import _LOCK_TASKS_WITH_CLAIMS, _TASKS_WITH_CLAIMS
from duplex.storage.submission import create_task
from duplex.storage.task_state import _DISTINCT_STATES, _STATES_PRESENT
from duplex.templates import parse_template

ws = workflow_steps
NOW = utcnow()
CHAIN = parse_template(
    'name = "direct"\n'
    '[[steps]]\nname = "a"\nhandler = "t.h"\n'
    '[[steps]]\nname = "b"\nhandler = "t.h"\ndepends_on = ["a"]\n'
    '[[steps]]\nname = "c"\nhandler = "t.h"\ndepends_on = ["b"]\n'
)


def _tasks(db: Database, count: int = 2) -> list[str]:
    with db.write() as conn:
        ids = [create_task(conn, CHAIN, {"n": i}, now=NOW) for i in range(count)]
        # The first step of each complete, with a result: the others' parents read it.
        conn.execute(
            update(ws)
            .where(ws.c.name == "a")
            .values(state=COMPLETE, results={"out": [1, "ü"]}, completed_at=NOW)
        )
    return ids


def _both(conn: Connection, direct: DirectStatement, params: dict[str, Any]) -> tuple[Any, Any]:
    """What SQLAlchemy's execution returns, then what the DirectStatement does, each in a
    savepoint rolled back (an UPDATE's rows are found again by the second)."""
    nested = conn.begin_nested()
    result = conn.execute(direct.statement, params)
    keys = tuple(result.keys()) if result.returns_rows else ()
    expected = [tuple(row) for row in result] if result.returns_rows else result.rowcount
    nested.rollback()
    nested = conn.begin_nested()
    if result.returns_rows:
        rows = direct.rows(conn, params)
        got: Any = [tuple(row) for row in rows]
        assert all(row._fields == keys for row in rows)
    else:
        got = direct.rowcount(conn, params)
    nested.rollback()
    return expected, got


def _same_rows(expected: Any, got: Any) -> None:
    # RETURNING gives no order: compare as sorted reprs of the rows.
    if isinstance(expected, list):
        assert sorted(map(repr, got)) == sorted(map(repr, expected))
    else:
        assert got == expected


def test_a_select_with_typed_parameters_and_in_lists_of_every_length(db: Database) -> None:
    ids = _tasks(db, 3)
    given = {"now": NOW, "since": NOW - timedelta(days=1), "at": NOW}
    query = DirectStatement(
        select(ws.c.step_uuid, ws.c.created_at, ws.c.results, ws.c.retryable, ws.c.state)
        .where(
            ws.c.task_uuid.in_(bindparam("ids", expanding=True)),
            ws.c.state.in_([PENDING, COMPLETE]),  # a list of the statement's own
            ws.c.created_at <= bindparam("now", type_=UTCDateTime()),
            ws.c.updated_at <= bindparam("now", type_=UTCDateTime()),  # the same one again
            ws.c.created_at > bindparam("since", type_=UTCDateTime()),
            # Equal only as the column stores it (on SQLite, text of one shape).
            ws.c.created_at == bindparam("at", type_=UTCDateTime()),
        )
        .order_by(ws.c.step_uuid)
    )
    with db.read() as conn:
        for some in ([], ids[:1], ids, ids[1:]):  # each length prepared, then one again
            expected, got = _both(conn, query, {"ids": some, **given})
            assert got == expected
            assert len(got) == 3 * len(some)
        first = query.rows(conn, {"ids": ids[:1], **given})[0]
    # Converted as the column types convert: an aware datetime, parsed JSON, a bool.
    assert first.created_at == NOW
    assert first.created_at.tzinfo is not None
    assert isinstance(first.retryable, bool)
    assert {type(row.results) for row in [first]} <= {dict, type(None)}


def test_a_textual_statement_converts_its_declared_columns(db: Database) -> None:
    (task,) = _tasks(db, 1)
    query = DirectStatement(
        text("SELECT name, created_at FROM workflow_steps WHERE task_uuid = :t ORDER BY name")
        .bindparams(bindparam("t", type_=String()))
        .columns(column("name", String()), column("created_at", UTCDateTime()))
    )
    with db.read() as conn:
        expected, got = _both(conn, query, {"t": task})
    assert got == expected == [("a", NOW), ("b", NOW), ("c", NOW)]


def test_an_update_counts_the_rows_it_matched_and_writes_what_sqlalchemy_writes(
    db: Database,
) -> None:
    ids = _tasks(db, 2)
    later = NOW + timedelta(seconds=1)
    touch = DirectStatement(
        update(ws)
        .where(ws.c.task_uuid.in_(bindparam("ids", expanding=True)), ws.c.state == PENDING)
        .values(updated_at=bindparam("now", type_=UTCDateTime()))
    )
    with db.write() as conn:
        assert _both(conn, touch, {"ids": ids, "now": later}) == (4, 4)
        assert touch.rowcount(conn, {"ids": ids[:1], "now": later}) == 2
    with db.read() as conn:  # found by SQLAlchemy's own equality: stored in the same shape
        touched = conn.execute(select(ws.c.task_uuid).where(ws.c.updated_at == later)).all()
    assert [task for (task,) in touched] == [ids[0], ids[0]]


def test_the_hop_statements_match_sqlalchemys(db: Database) -> None:
    """Every statement a chain's hop runs at the driver, on the same rows."""
    ids = _tasks(db, 2)
    with db.read() as conn:
        steps = dict(
            conn.execute(select(ws.c.name, ws.c.step_uuid).where(ws.c.task_uuid == ids[0])).all()
        )
    lock = _LOCK_TASKS_WITH_CLAIMS if db.dialect == "postgresql" else _TASKS_WITH_CLAIMS
    level = {"s0": ENQUEUED, "n0": "default", "p0": 0, "c0": NOW, "limit": 10}
    checks: list[tuple[DirectStatement, dict[str, Any]]] = [
        (lock, {"task_ids": ids, "step_ids": list(steps.values())}),
        (_LAST_SEQUENCES, {"ids": ids}),
        (_STATES_PRESENT if db.is_sqlite else _DISTINCT_STATES, {"ids": ids}),
        (_ENQUEUE_READY, {"parents": [steps["a"]], "now": NOW}),
        (
            due_levels_statement(1),
            {"n0": "default", "now": NOW},
        ),
        (ready_statement(1, not db.is_sqlite), level),
    ]
    with db.write() as conn:
        # A step of the other task waits in the queue: the claim order's reads find it.
        conn.execute(
            update(ws)
            .where(ws.c.task_uuid == ids[1], ws.c.name == "b")
            .values(state=ENQUEUED, next_attempt_at=NOW)
        )
        for direct, params in checks:
            expected, got = _both(conn, direct, params)
            assert expected, f"nothing to compare: {direct.statement}"
            _same_rows(expected, got)
        # The claim of a step made ready, with its parents' results read in its RETURNING.
        conn.execute(
            update(ws)
            .where(ws.c.step_uuid == steps["b"])
            .values(state=ENQUEUED, next_attempt_at=NOW)
        )
        claim = _CLAIM[db.dialect]
        params = {"ids": [steps["b"]], "worker_id": "w1", "now": NOW}
        expected, got = _both(conn, claim, params)
        assert len(expected) == 1
        _same_rows(expected, got)
        (row,) = claim.rows(conn, params)
    assert row.step_uuid == steps["b"]
    assert row.attempts == 1
    assert row.created_at == NOW
    assert row.task_context == {"n": 0}
    assert parents_of(db.dialect, row.parents) == ({"a": {"out": [1, "ü"]}}, [])


def test_a_statement_refused_by_the_database_is_a_storage_error(db: Database) -> None:
    insert_pause = DirectStatement(
        pauses.insert().values(
            kind=literal("namespace"),
            name=bindparam("name"),
            paused_by=literal("test"),
            paused_at=bindparam("now", type_=UTCDateTime()),
        )
    )
    with db.write() as conn:
        assert insert_pause.rowcount(conn, {"name": "n1", "now": NOW}) == 1
    with pytest.raises(StorageError) as failed, db.write() as conn:  # noqa: PT012
        insert_pause.rowcount(conn, {"name": "n2", "now": NOW})
        insert_pause.rowcount(conn, {"name": "n1", "now": NOW})  # the same key again
    assert failed.value.refused
    assert not failed.value.transient
    with db.read() as conn:  # the whole transaction rolled back, n2 with it
        assert conn.execute(select(pauses.c.name)).scalars().all() == ["n1"]


def test_a_write_meeting_another_writers_lock_is_a_transient_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    db = Database(DatabaseSettings(url=url, busy_timeout_ms=0))
    upgrade_to_head(db)
    holder = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    touch = DirectStatement(update(tasks).values(updated_at=bindparam("now", type_=UTCDateTime())))
    try:
        holder.execute("BEGIN IMMEDIATE")
        # A read transaction does not take the write lock up front: its write meets it here.
        with pytest.raises(StorageError) as failed, db.read() as conn:
            touch.rowcount(conn, {"now": NOW})
        assert failed.value.transient
    finally:
        holder.rollback()
        holder.close()
        db.dispose()


def test_a_parameter_rendered_into_the_sql_is_refused(db: Database) -> None:
    query = DirectStatement(
        select(ws.c.step_uuid).limit(bindparam("n", literal_execute=True, type_=Integer()))
    )
    with db.read() as conn, pytest.raises(ValueError, match="literal_execute"):
        query.rows(conn, {"n": 1})


def test_a_missing_parameter_is_an_error_not_a_value_from_another_call(db: Database) -> None:
    query = DirectStatement(select(ws.c.step_uuid).where(ws.c.task_uuid == bindparam("t")))
    with db.read() as conn:
        assert query.rows(conn, {"t": "none"}) == []
        with pytest.raises(KeyError):
            query.rows(conn, {})


def test_the_engines_cursor_events_see_every_statement_run_at_the_driver(db: Database) -> None:
    # As a tracing integration listens: it keeps its span on the execution context.
    seen: list[tuple[str, str]] = []

    def before(
        _conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, *_: Any
    ) -> None:
        context.span = statement
        seen.append(("before", statement))

    def after(
        _conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, *_: Any
    ) -> None:
        seen.append(("after", context.span))

    query = DirectStatement(select(ws.c.step_uuid).where(ws.c.task_uuid == bindparam("t")))
    event.listen(db.engine, "before_cursor_execute", before)
    event.listen(db.engine, "after_cursor_execute", after)
    try:
        with db.read() as conn:
            seen.clear()  # the transaction's own BEGIN, where the driver sends one
            query.rows(conn, {"t": "none"})
    finally:
        event.remove(db.engine, "before_cursor_execute", before)
        event.remove(db.engine, "after_cursor_execute", after)
    assert [when for when, _ in seen] == ["before", "after"]
    assert all("FROM workflow_steps" in statement for _, statement in seen)


def test_the_shapes_kept_compiled_are_bounded(sqlite_db: Database) -> None:
    # A batch's IN lists take any length up to its size: each length is a statement of its
    # own, and a long-lived worker must not keep every one it ever ran.
    query = DirectStatement(select(ws.c.step_uuid).where(ws.c.step_uuid.in_(bindparam("ids"))))
    with sqlite_db.read() as conn:
        for n in range(1, SHAPES_KEPT + 20):
            assert query.rows(conn, {"ids": [f"missing-{i}" for i in range(n)]}) == []
    assert query._shape.cache_info().currsize == SHAPES_KEPT


def test_postgresql_takes_a_list_of_any_other_length_than_one_as_one_prepared_array(
    postgres_db: Database,
) -> None:
    ids = _tasks(postgres_db, 8)
    query = DirectStatement(
        select(ws.c.step_uuid).where(
            ws.c.task_uuid.in_(bindparam("ids", expanding=True)),
            ws.c.name.not_in(bindparam("names", expanding=True)),
            ws.c.state.in_([PENDING, COMPLETE]),  # the statement's own: stays a list
        )
    )
    with postgres_db.read() as conn:
        for n in [0, 1, 2, 3, 8]:
            expected, got = _both(conn, query, {"ids": ids[:n], "names": ["b"] * n})
            assert sorted(got) == sorted(expected)
            assert len(got) == 2 * n
    with postgres_db.read() as conn:
        # psycopg prepares a text on its fifth run on a connection (a rollback, a savepoint's
        # too, forgets them all): as IN lists these would be four texts run twice each.
        for n in [2, 3, 5, 8] * 2:
            assert len(query.rows(conn, {"ids": ids[:n], "names": ["b"] * n})) == 2 * n
        prepared = conn.exec_driver_sql(
            "SELECT statement FROM pg_prepared_statements WHERE statement LIKE %(like)s",
            {"like": "%workflow_steps.task_uuid%"},
        ).scalars()
        texts = [" ".join(text.split()) for text in prepared]
    assert len(texts) == 1
    assert "workflow_steps.task_uuid = ANY ($1::VARCHAR[])" in texts[0]
    assert "workflow_steps.name != ALL ($2::VARCHAR[])" in texts[0]
    assert "workflow_steps.state IN ($3::VARCHAR, $4::VARCHAR)" in texts[0]
    # A list of one value stays an IN list, which PostgreSQL plans as ``= value``.
    with postgres_db.read() as conn:
        for _ in range(6):
            assert len(query.rows(conn, {"ids": ids[:1], "names": ["b"]})) == 2
        prepared = conn.exec_driver_sql(
            "SELECT statement FROM pg_prepared_statements WHERE statement LIKE %(like)s",
            {"like": "%workflow_steps.task_uuid IN ($1::VARCHAR)%"},
        ).scalars()
        assert len(list(prepared)) == 1


class _Lowered(TypeDecorator[str]):
    """A bound value lower-cased on its way in."""

    impl = String(10)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else value.lower()


def test_lists_as_arrays_find_what_in_lists_find(db: Database) -> None:
    ids = _tasks(db, 2)
    among = ws.c.task_uuid.in_(bindparam("ids", expanding=True))
    besides = ws.c.task_uuid.not_in(bindparam("ids", expanding=True))
    lowered = ws.c.name.in_(bindparam("names", type_=_Lowered(), expanding=True))
    untyped = literal_column("workflow_steps.name").in_(bindparam("names", expanding=True))
    # Longer than the column (an array's items cast to varchar(36) would be cut to a match),
    # NULLs, repeats; a bound type of its own; a column that says nothing of its type.
    cases: list[tuple[Any, str, list[list[Any]]]] = [
        (among, "ids", [[ids[0] + "-and-more", "x"], [None, ids[1]], [ids[0], ids[0]]]),
        (besides, "ids", [[ids[0] + "-and-more", "x"], [ids[0], None], [ids[1], ids[1]]]),
        (lowered, "names", [["A", "B"], ["C", "Z", "a"]]),
        (untyped, "names", [["a", "b"], ["c", "z"]]),
    ]
    with db.read() as conn:
        for condition, name, lists in cases:
            query = DirectStatement(select(ws.c.step_uuid).where(condition))
            for values in lists:
                expected, got = _both(conn, query, {name: values})
                assert sorted(got) == sorted(expected), (condition, values)


def test_without_listeners_statements_skip_sqlalchemys_execution(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    through_sqlalchemy = Connection.exec_driver_sql

    def counted(self: Connection, statement: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(statement)
        return through_sqlalchemy(self, statement, *args, **kwargs)

    monkeypatch.setattr(Connection, "exec_driver_sql", counted)
    query = DirectStatement(select(ws.c.step_uuid).where(ws.c.task_uuid == bindparam("t")))
    with db.read() as conn:
        assert query.rows(conn, {"t": "none"}) == []
    assert calls == []


def test_a_value_the_statement_cannot_take_is_refused_data(db: Database) -> None:
    query = DirectStatement(
        select(ws.c.step_uuid).where(ws.c.created_at == bindparam("at", type_=UTCDateTime()))
    )
    with pytest.raises(StorageError, match="naive") as failed, db.read() as conn:
        query.rows(conn, {"at": NOW.replace(tzinfo=None)})
    assert failed.value.refused


def test_parameters_sqlalchemy_would_take_and_this_would_not_are_refused(db: Database) -> None:
    # SQLAlchemy would write a column named by an extra parameter, or replace a constant.
    touch = DirectStatement(
        update(ws).where(ws.c.step_uuid == bindparam("id")).values(state=PENDING)
    )
    with db.write() as conn:
        with pytest.raises(ValueError, match="'name'"):
            touch.rowcount(conn, {"id": "none", "name": "renamed"})
        with pytest.raises(ValueError, match="'state'"):
            touch.rowcount(conn, {"id": "none", "state": COMPLETE})
    with pytest.raises(ValueError, match="driver's type code"):
        DirectStatement(select(cast(ws.c.attempts, Float).label("share")))
