"""Rate limits: the bucket keeps every window of one period to ``limit + burst`` starts
(hypothesis over arrival times); in storage, on SQLite and PostgreSQL, a claim takes tokens,
defers the candidates whose tokens are not there to when they are expected, and says when
to look again; claims racing on PostgreSQL connections keep the rate, read from the claims'
own times.
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from duplex.clock import utcnow
from duplex.errors import InputError, TemplateError
from duplex.flow.rates import Rate, parse_rate
from duplex.storage.claims import claim_ready_steps
from duplex.storage.concurrency import ClaimHints
from duplex.storage.db import Database
from duplex.storage.models import tasks, workflow_step_transitions, workflow_steps
from duplex.storage.rate_limits import declare_limits, list_limits, set_limit
from duplex.storage.submission import create_tasks
from duplex.templates import parse_template
from tests.storage.support import starts_in_windows

ws = workflow_steps


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 20),
    period_ms=st.integers(10, 2000),
    burst=st.integers(0, 5),
    gaps_us=st.lists(st.integers(0, 300_000), min_size=1, max_size=200),
)
def test_the_bucket_never_lets_more_than_limit_plus_burst_start_in_a_period(
    limit: int, period_ms: int, burst: int, gaps_us: list[int]
) -> None:
    rate = Rate(limit, timedelta(milliseconds=period_ms), burst)
    now, tat = datetime(2026, 1, 1), None
    started: list[datetime] = []
    for gap in gaps_us:
        now += timedelta(microseconds=gap)
        taken = rate.reserve(tat, now)
        if taken.start_at <= now:
            started.append(now)
            tat = taken.tat
        else:  # not there: expected later, never earlier than now
            assert taken.start_at > now
    assert starts_in_windows(started, rate.period) <= limit + burst
    # And it is no stricter than that: asked at once, a full bucket lets burst + 1 start.
    fresh = [rate.reserve(None, now)]
    for _ in range(burst):
        fresh.append(rate.reserve(fresh[-1].tat, now))
    assert all(r.start_at == now for r in fresh)


def test_rates_read_and_written() -> None:
    assert parse_rate("100/s") == Rate(100, timedelta(seconds=1))
    assert parse_rate("5/200ms", burst=2).text() == "5/200ms"
    assert parse_rate("10/m").text() == "10/m"
    assert parse_rate("7/2h").text() == "7/2h"
    for bad in ("0/s", "10/q", "1/0s", "s", "10/", "-1/s"):
        with pytest.raises(ValueError, match="invalid rate"):
            parse_rate(bad)


LIMITED = parse_template(
    'name = "charge"\n[[steps]]\nname = "c"\nhandler = "t.c"\nrate_limit = "payments"\n'
)


def declare(db: Database, rate: str, burst: int = 0, name: str = "payments") -> None:
    with db.write() as conn:
        set_limit(conn, name, parse_rate(rate, burst), now=utcnow(), operator="test")


def claim(
    db: Database, now: datetime, limit: int = 10, worker: str = "w1", hints: Any = None
) -> list[Any]:
    with db.write() as conn:
        return claim_ready_steps(
            conn, worker_id=worker, namespaces=("default",), limit=limit, now=now, hints=hints
        )


def test_a_claim_takes_tokens_and_defers_the_rest_to_when_they_come(db: Database) -> None:
    declare(db, "5/s")
    t0 = utcnow()
    with db.write() as conn:
        create_tasks(conn, LIMITED, [{}] * 4, now=t0)
    hints = ClaimHints()
    assert len(claim(db, t0, hints=hints)) == 1
    # The other three keep their state, each expected one share of the rate after the last.
    with db.read() as conn:
        waiting = sorted(
            conn.execute(select(ws.c.next_attempt_at).where(ws.c.state == "enqueued")).scalars()
        )
    share = timedelta(milliseconds=200)
    assert waiting == [t0 + share, t0 + 2 * share, t0 + 3 * share]
    assert hints.tokens_at == t0 + share
    assert claim(db, t0 + share - timedelta(microseconds=1)) == []
    assert len(claim(db, t0 + share)) == 1
    # A worker that comes late still takes one token per start, not the ones it missed.
    late = t0 + 10 * share
    assert len(claim(db, late)) == 1
    assert claim(db, late) == []
    with db.read() as conn:
        (payments,) = list_limits(conn, now=late)
    assert payments.rate == Rate(5, timedelta(seconds=1))
    assert payments.tokens == 0.0


def test_units_and_burst(db: Database) -> None:
    declare(db, "10/s", burst=3)
    template = parse_template(
        'name = "bulk"\n[[steps]]\nname = "b"\nhandler = "t.b"\n'
        'rate_limit = { name = "payments", units = 2 }\n'
    )
    t0 = utcnow()
    with db.write() as conn:
        create_tasks(conn, template, [{}] * 4, now=t0)
    # A full bucket holds burst + 1 = 4 units: two starts of 2 units.
    assert len(claim(db, t0)) == 2


def test_a_step_naming_an_unknown_limit_is_refused_and_nothing_is_written(db: Database) -> None:
    with (
        pytest.raises(InputError, match="rate limit 'payments' is not declared"),
        db.write() as conn,
    ):
        create_tasks(conn, LIMITED, [{}], now=utcnow())
    with db.read() as conn:
        assert conn.execute(select(func.count()).select_from(tasks)).scalar_one() == 0


def test_settings_declare_limits_that_sql_does_not_have(db: Database) -> None:
    from duplex.flow.rates import DeclaredLimit

    declare(db, "7/s")
    declared = {"payments": DeclaredLimit(rate="100/s"), "mail": DeclaredLimit(rate="2/m", burst=1)}
    with db.write() as conn:
        assert declare_limits(conn, declared, now=utcnow()) == ["mail"]
    with db.read() as conn:
        rates = {limit.name: limit.rate for limit in list_limits(conn, now=utcnow())}
    # The one set in SQL is kept: an operator changed it on purpose.
    assert rates == {
        "payments": Rate(7, timedelta(seconds=1)),
        "mail": Rate(2, timedelta(minutes=1), 1),
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('rate_limit = "bad name"', "String should match pattern"),
        ('rate_limit = { name = "p", units = 0 }', "greater than or equal to 1"),
        ('rate_limit = { name = "p", extra = 1 }', "unknown field"),
    ],
)
def test_bad_rate_limit_declarations_are_refused(text: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        parse_template(f'name = "x"\n[[steps]]\nname = "s"\nhandler = "t.s"\n{text}\n')
    with pytest.raises(TemplateError, match="a sleep step runs no handler; `rate_limit`"):
        parse_template(
            'name = "x"\n[[steps]]\nname = "z"\nkind = "sleep"\nduration = "1s"\nrate_limit = "p"\n'
        )


@settings(
    max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    limit=st.integers(2, 8),
    burst=st.integers(0, 3),
    claimers=st.integers(2, 4),
    steps=st.integers(10, 30),
)
def test_racing_claims_keep_the_rate(
    postgres_db: Database, limit: int, burst: int, claimers: int, steps: int
) -> None:
    """Claimers on their own connections claim at their own times until every step ran; the
    claims' times (their transition rows) keep every 100 ms window to limit + burst."""
    db = postgres_db
    name = f"r{uuid.uuid4().hex[:8]}"
    period = timedelta(milliseconds=100)
    declare(db, f"{limit}/100ms", burst, name=name)
    template = parse_template(
        f'name = "{name}"\n[[steps]]\nname = "c"\nhandler = "t.c"\nrate_limit = "{name}"\n'
    )
    with db.write() as conn:
        ids = create_tasks(conn, template, [{}] * steps, now=utcnow())
    errors: list[BaseException] = []
    claimed: list[int] = []

    def run(i: int) -> None:
        try:
            while sum(claimed) < steps and not errors:
                claimed.append(len(claim(db, utcnow(), limit=3, worker=f"w{i}")))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    t = workflow_step_transitions
    with db.read() as conn:
        times = list(
            conn.execute(
                select(t.c.created_at)
                .join(ws, ws.c.step_uuid == t.c.step_uuid)
                .where(ws.c.task_uuid.in_(ids), t.c.to_state == "in_progress")
            ).scalars()
        )
    assert len(times) == steps
    assert starts_in_windows(times, period) <= limit + burst


def test_a_start_of_more_units_than_the_burst_holds_still_starts() -> None:
    rate = parse_rate("100/s")  # burst 0: one unit at once
    now = datetime(2026, 1, 1)
    first = rate.reserve(None, now, units=5)
    assert first.start_at == now  # it goes on its first unit's token...
    # ...and the next start waits until the bucket has paid what it owes.
    assert rate.reserve(first.tat, now, units=1).start_at == first.tat


def test_a_share_of_the_rate_is_never_shorter_than_the_rate_says() -> None:
    rate = parse_rate("3/s")
    assert rate.interval == timedelta(microseconds=333_334)
    now, tat, started = datetime(2026, 1, 1), None, []
    for step in range(10):
        at = now + step * timedelta(microseconds=1)
        taken = rate.reserve(tat, at)
        if taken.start_at <= at:
            started.append(at)
            tat = taken.tat
    later = rate.reserve(tat, now + timedelta(seconds=1) - timedelta(microseconds=1))
    assert len(started) == 1
    assert later.start_at >= now + timedelta(seconds=1) - timedelta(microseconds=1)
    with pytest.raises(ValueError, match="at most 1 per microsecond"):
        parse_rate("2000000/s")


def test_changing_a_limit_takes_effect_at_once(db: Database) -> None:
    declare(db, "1/m")
    t0 = utcnow()
    with db.write() as conn:
        create_tasks(conn, LIMITED, [{}] * 3, now=t0)
    assert len(claim(db, t0)) == 1  # the bucket now owes a minute at 1/m
    declare(db, "100/s")  # owed: one unit, paid at 100/s
    with db.read() as conn:
        (payments,) = list_limits(conn, now=t0)
    assert payments.tokens == 0.0
    with db.write() as conn:
        conn.execute(workflow_steps.update().values(next_attempt_at=t0))  # due again now
    # A second later, not a minute: the new rate pays the old debt.
    assert len(claim(db, t0 + timedelta(seconds=1))) == 1
