"""Rate limits in SQL: the ``rate_limits`` rows, and the tokens a claim takes of them.

A claim takes the tokens of each candidate with a ``rate_limit`` in claim order
(``take_tokens``): the limit's row is locked (``FOR UPDATE`` on PostgreSQL, in name order;
SQLite serialises writers), its bucket decides (``duplex.flow.rates``), and the row's ``tat``
moves on for each start. Tokens are only ever taken by a claim, at its time, so the starts
themselves keep the rate, however late a worker comes to them.

A candidate whose tokens are not there is not claimed: its not-before time
(``next_attempt_at``, also its place in the claim order) moves to when they are expected
(each such candidate one share of the rate after the one before); its state stays. The claim
reports when the next step waiting for the limit is due, and the worker looks then: no
polling for tokens. A start that came first may have taken them; the step then waits again.

A limit that no longer exists does not hold a step back (``duplex limits`` has no delete; a
submission naming an unknown limit is refused).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from duplex.errors import InputError
from duplex.flow.rates import DeclaredLimit, Rate, RateLimitUse
from duplex.states import CLAIMABLE
from duplex.storage.models import rate_limits, workflow_steps
from duplex.templates import TaskTemplate

ws = workflow_steps
rl = rate_limits


@dataclass(frozen=True)
class LimitRow:
    """A limit as ``duplex limits list`` shows it."""

    name: str
    rate: Rate
    tokens: float
    updated_at: datetime
    updated_by: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rate": self.rate.text(),
            "limit": self.rate.limit,
            "period_ms": round(self.rate.period.total_seconds() * 1000),
            "burst": self.rate.burst,
            "tokens": round(self.tokens, 3),
            "updated_at": self.updated_at.isoformat(),
            "updated_by": self.updated_by,
        }


def rate_columns(use: RateLimitUse | Mapping[str, Any] | None) -> dict[str, Any]:
    """The step row's rate limit columns for what its template declares."""
    if use is None:
        return {"rate_limit": None, "rate_units": None}
    if isinstance(use, RateLimitUse):
        return {"rate_limit": use.name, "rate_units": use.units}
    return {"rate_limit": use["name"], "rate_units": use.get("units", 1)}


def check_limits_exist(conn: Connection, template: TaskTemplate) -> None:
    """Refuse a template whose steps name a rate limit that is not declared."""
    named = {step.name: step.rate_limit.name for step in template.steps if step.rate_limit}
    if not named:
        return
    known = set(
        conn.execute(select(rl.c.name).where(rl.c.name.in_(sorted(set(named.values()))))).scalars()
    )
    for step, name in named.items():
        if name not in known:
            raise InputError(
                f"step {step!r}: rate limit {name!r} is not declared "
                f"(`duplex limits set {name} 100/s`, or [rate_limits] in the settings)"
            )


def set_limit(
    conn: Connection, name: str, rate: Rate, *, now: datetime, operator: str | None
) -> Rate | None:
    """Create or change the limit ``name``; return the rate it had (None: new). It takes
    effect at once: the units the bucket owes are kept and paid at the new rate. (Steps
    already waiting for tokens keep the time they were given, and look then.)"""
    row = conn.execute(select(*_RATE_COLUMNS).where(rl.c.name == name).with_for_update()).first()
    values = _row_values(rate, now=now, operator=operator)
    if row is None:
        conn.execute(insert(rl).values(name=name, tat=None, **values))
        return None
    before = _rate(row)
    tat = rate.rescaled(row.tat, now, before)
    conn.execute(update(rl).where(rl.c.name == name).values(tat=tat, **values))
    return before


def declare_limits(
    conn: Connection, declared: Mapping[str, DeclaredLimit], *, now: datetime
) -> list[str]:
    """Insert the settings' limits that do not exist yet (a limit in SQL is never
    overwritten: ``duplex limits set`` changed it on purpose); return the names inserted."""
    if not declared:
        return []
    added = []
    for name in sorted(declared):
        rate = declared[name].parsed()
        # Workers starting together: the first insert wins, the others change nothing.
        row = {**_row_values(rate, now=now, operator="settings"), "name": name, "tat": None}
        if conn.execute(_insert_if_absent(conn, row)).first() is not None:
            added.append(name)
    return added


def _insert_if_absent(conn: Connection, row: dict[str, Any]) -> Any:
    module = postgresql if conn.dialect.name == "postgresql" else sqlite
    insert_row = module.insert(rl).values(**row)
    return insert_row.on_conflict_do_nothing(index_elements=[rl.c.name]).returning(rl.c.name)


def _row_values(rate: Rate, *, now: datetime, operator: str | None) -> dict[str, Any]:
    return {
        "limit": rate.limit,
        "period_ms": round(rate.period.total_seconds() * 1000),
        "burst": rate.burst,
        "updated_at": now,
        "updated_by": operator,
    }


def list_limits(conn: Connection, *, now: datetime) -> list[LimitRow]:
    rows = conn.execute(
        select(*_RATE_COLUMNS, rl.c.updated_at, rl.c.updated_by).order_by(rl.c.name)
    )
    return [
        LimitRow(row.name, rate, rate.tokens(row.tat, now), row.updated_at, row.updated_by)
        for row in rows
        for rate in [_rate(row)]
    ]


@dataclass
class Tokens:
    """What ``take_tokens`` decided: the candidates that start now, and when the others'
    tokens are expected."""

    admitted: dict[str, str]
    deferred: dict[str, datetime]
    # When the first step that waits for these limits' tokens is due (None: none waits).
    next_due_at: datetime | None = None


def take_tokens(
    conn: Connection,
    candidates: Mapping[str, str],
    uses: Mapping[str, tuple[str, int]],
    *,
    now: datetime,
    wait: bool,
) -> Tokens:
    """Take the tokens of ``candidates`` (in claim order) whose step uses a limit (``uses``:
    step uuid -> limit name, units); defer those whose tokens are not there.

    ``wait=False``: a limit another transaction holds is skipped, its candidates neither
    admitted nor deferred (they stay in the queue for a later claim).
    """
    names = sorted({uses[s][0] for s in candidates if s in uses})
    buckets = _lock(conn, names, wait=wait) if names else {}
    tats = {name: tat for name, (_, tat) in buckets.items()}
    # Where the deferred candidates' expected times are counted from (never stored).
    expected = dict(tats)
    admitted: dict[str, str] = {}
    deferred: dict[str, datetime] = {}
    for step_uuid, state in candidates.items():
        use = uses.get(step_uuid)
        if use is None:
            admitted[step_uuid] = state
            continue
        name, units = use
        if name not in buckets:
            if wait:  # the limit is gone: nothing holds the step back
                admitted[step_uuid] = state
            continue  # else another transaction holds it: a later claim takes the step
        rate = buckets[name][0]
        taken = rate.reserve(tats[name], now, units)
        if taken.start_at <= now:
            admitted[step_uuid] = state
            tats[name] = expected[name] = taken.tat
        else:
            later = rate.reserve(expected[name], now, units)
            expected[name] = later.tat
            deferred[step_uuid] = later.start_at
    changed = [{"b_name": n, "v_tat": t} for n, t in tats.items() if t != buckets[n][1]]
    if changed:
        conn.execute(_SET_TAT, changed)
    if deferred:
        conn.execute(_DEFER, [{"b_step_uuid": s, "v_at": at} for s, at in deferred.items()])
    # When the next step waiting for these limits' tokens is due (deferred by this claim or an
    # earlier one): the worker looks then, so a line of deferred steps never waits for a poll.
    waiting = conn.execute(_NEXT_WAITING, {"names": sorted(buckets), "now": now}).scalar()
    return Tokens(admitted, deferred, waiting)


def _lock(conn: Connection, names: Sequence[str], *, wait: bool) -> dict[str, tuple[Rate, Any]]:
    query = select(*_RATE_COLUMNS).where(rl.c.name.in_(names)).order_by(rl.c.name)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=not wait)
    return {row.name: (_rate(row), row.tat) for row in conn.execute(query)}


def _rate(row: Any) -> Rate:
    return Rate(row.limit, timedelta(milliseconds=row.period_ms), row.burst)


_NEXT_WAITING = select(func.min(ws.c.next_attempt_at)).where(
    ws.c.rate_limit.in_(bindparam("names", expanding=True)),
    ws.c.state.in_(CLAIMABLE),
    ws.c.next_attempt_at > bindparam("now", type_=ws.c.next_attempt_at.type),
)
_RATE_COLUMNS = (rl.c.name, rl.c.limit, rl.c.period_ms, rl.c.burst, rl.c.tat)
_SET_TAT = (
    update(rl)
    .where(rl.c.name == bindparam("b_name"))
    .values(tat=bindparam("v_tat", type_=rl.c.tat.type))
)
# The step keeps its state (``enqueued`` or ``waiting_for_retry``): only its not-before time
# moves to when its tokens are expected.
_DEFER = (
    update(ws)
    .where(ws.c.step_uuid == bindparam("b_step_uuid"))
    .values(next_attempt_at=bindparam("v_at", type_=ws.c.next_attempt_at.type))
)
