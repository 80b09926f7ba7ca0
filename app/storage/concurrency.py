"""Concurrency keys in SQL: at most ``limit`` attempts with the same key run at once.

No counter is kept: a key's running attempts are its steps ``in_progress``, counted by the
claim itself. So a result's commit, a lost worker's recovery, a cancel or a deadline frees the
slot by the state change it makes anyway, in its own transaction.

* **Admitting** (``admit``, in every claim with a keyed or limited candidate): the candidates
  with a key are admitted in claim order while their key has room; the others are *held*:
  they move to ``waiting`` (transition reason ``held by concurrency key ...``), out of the
  claim's way, and are no attempt (no retry is used). Holding is what makes the claim fair
  across keys: a key with 10,000 ready steps is held back to its limit, and the claim
  reaches the steps of other keys behind them.
* **Letting go** (``let_go``): a commit that ends keyed attempts moves as many held steps of
  their keys back to ``enqueued`` (the oldest first, by priority), in the same transaction.
* **The sweep** (``keys_with_room``, then ``sweep_held``: each worker's watchdog, every
  second): a key with held steps and room for them (a step let go but then cancelled, a slot
  freed by a cancel or a deadline) gets them back; nothing stays held for longer than a sweep
  while its key has room.

Exact across workers: on PostgreSQL a claim counts a key's running attempts only under that
key's transaction-level advisory lock, so two claims never count the same running attempts;
the lock ends with the transaction, also when the worker is killed. A claim's first round
waits for its keys' locks, taken in one global order (by the key's hash); its later rounds,
and a claim made inside a result's commit (eager dispatch, which holds task locks), only
*try* them, skipping a key that is busy: nothing waits for a lock while holding one out of
order. Letting go takes no key lock (a step let go beyond a key's room is held again by the
claim that counts it) and skips held rows another transaction holds, so a commit never waits
for a claim nor for ``duplex cancel``. On SQLite writers are serialised already (``BEGIN
IMMEDIATE``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, bindparam, case, func, or_, select, text, update

from duplex.states import CLAIMABLE, ENQUEUED, IN_PROGRESS, WAITING
from duplex.storage.driver import db_time
from duplex.storage.models import HELD_BY_KEY, workflow_steps
from duplex.storage.rate_limits import take_tokens
from duplex.storage.readiness import ReadyStep
from duplex.storage.transitions import insert_transitions, transition_row

ws = workflow_steps

# The advisory lock space of concurrency keys (PostgreSQL's two-integer form: this class,
# then the key's hash), apart from the single-integer locks of migrations.
_LOCK_CLASS = 0x44504C58  # "DPLX"


@dataclass
class Admission:
    """Which candidates a claim may take, and how many it held back."""

    admitted: dict[str, str]
    # Candidates held back by a key, or waiting for a rate limit's tokens.
    held: int = 0
    # When the next step waiting for a rate limit's tokens is due (look again then).
    tokens_at: datetime | None = None
    # The waits caused: holds per key path (``context.customer_id``), deferrals per limit.
    waits: Counter[tuple[str, str]] = field(default_factory=Counter)

    @classmethod
    def first(cls, candidates: Mapping[str, str], room: int) -> Admission:
        """The first ``room`` candidates, in their order: what a claim takes when none of
        them has a key or a limit."""
        return cls(dict(list(candidates.items())[:room]))


@dataclass
class ClaimHints:
    """What a claim learned besides its steps: when the next step waiting for a rate limit's
    tokens is due (look again then), and the waits flow control caused (``Admission``)."""

    tokens_at: datetime | None = None
    waits: Counter[tuple[str, str]] = field(default_factory=Counter)

    def look_by(self, due: datetime | None) -> datetime | None:
        """The earlier of ``due`` and ``tokens_at``: when the worker should look for work (a
        dependent a commit left waiting for tokens is looked for then, like a retry)."""
        return min((t for t in (due, self.tokens_at) if t is not None), default=None)

    def add(self, admission: Admission) -> None:
        if admission.tokens_at is not None:
            self.tokens_at = min(filter(None, (self.tokens_at, admission.tokens_at)))
        self.waits.update(admission.waits)


def admit(
    conn: Connection,
    candidates: Mapping[str, str],
    *,
    room: int,
    now: datetime,
    worker_id: str | None,
    wait: bool = True,
) -> Admission:
    """Admit up to ``room`` of ``candidates`` (step uuid -> the state it was read in, in claim
    order) and hold back every candidate whose key is at its limit; then take the rate limit
    tokens of those admitted (``duplex.storage.rate_limits``): a candidate whose tokens come
    later is not admitted, and ``tokens_at`` says when the next step waiting for them is due.

    ``wait=False`` (a claim inside a result's commit): a key or limit another transaction is
    using right now is skipped, its candidates neither admitted nor held.
    """
    if not candidates:
        return Admission({})
    flows = {row.step_uuid: row for row in conn.execute(_FLOW_OF, {"ids": list(candidates)})}
    if not flows:
        return Admission.first(candidates, room)
    keyed = {
        s: (row.concurrency_key, row.concurrency_limit)
        for s, row in flows.items()
        if row.concurrency_key is not None
    }
    keys = sorted({key for key, _ in keyed.values()})
    locked = _lock(conn, keys, wait=wait) if keys else set()
    running: Counter[str] = Counter(_pairs(conn, _RUNNING, keys=sorted(locked)) if locked else {})
    admitted: dict[str, str] = {}
    held: dict[str, tuple[str, str, int]] = {}
    for step_uuid, state in candidates.items():
        key, limit = keyed.get(step_uuid, (None, 0))
        if key is None:
            if len(admitted) < room:
                admitted[step_uuid] = state
        elif key not in locked:
            continue
        elif running[key] < limit:
            if len(admitted) < room:
                admitted[step_uuid] = state
                running[key] += 1
        else:
            held[step_uuid] = (state, key, limit)
    if held:
        _hold(conn, held, running, now=now, worker_id=worker_id)
    # Then the rate limits' tokens, for the candidates admitted so far.
    uses = {
        s: (row.rate_limit, row.rate_units or 1)
        for s, row in flows.items()
        if row.rate_limit is not None and s in admitted
    }
    waits = Counter(("concurrency_key", key.partition("=")[0]) for _, key, _ in held.values())
    if not uses:
        return Admission(admitted, len(held), None, waits)
    tokens = take_tokens(conn, admitted, uses, now=now, wait=wait)
    waits.update(("rate_limit", uses[step][0]) for step in tokens.deferred)
    return Admission(tokens.admitted, len(held) + len(tokens.deferred), tokens.next_due_at, waits)


def let_go(
    conn: Connection, freed: Counter[str], *, now: datetime, worker_id: str | None
) -> list[ReadyStep]:
    """Move up to ``freed[key]`` held steps of each key back to ``enqueued`` (a commit ended
    that many of its attempts); return them, ready to claim."""
    keys = sorted(key for key, count in freed.items() if count > 0)
    if not keys:
        return []
    # No key lock: a commit never waits for a claim. A claim holding a step back right now,
    # on a count made before this commit, commits it held after this read: the sweep lets it
    # go (within a second). Most keys hold nothing back: one read finds those that do.
    holding = sorted(conn.execute(_HOLDING_ANY, {"keys": keys}).scalars())
    let: list[Any] = []
    for key in holding:
        # Two statements: a LIMIT with SKIP LOCKED inside the update's IN may be run again by
        # PostgreSQL's plan and let go more than ``n``.
        oldest = list(conn.execute(_OLDEST_HELD, {"key": key, "n": freed[key]}).scalars())
        if oldest:
            let.extend(conn.execute(_LET_GO, {"ids": oldest, "now": now}))
    if let:
        at = db_time(conn.dialect, now)
        insert_transitions(
            conn,
            [
                transition_row(
                    row.step_uuid,
                    WAITING,
                    ENQUEUED,
                    row.attempts,
                    worker_id,
                    at,
                    f"a slot of concurrency key {row.concurrency_key} freed",
                )
                for row in let
            ],
        )
    return [
        ReadyStep(row.step_uuid, row.namespace, row.priority, row.kind, task_uuid=row.task_uuid)
        for row in let
    ]


def keys_with_room(conn: Connection, *, now: datetime) -> list[str]:
    """The keys that hold steps back though they have room for some (the sweep's find)."""
    limits = _pairs(conn, _HOLDING)
    return sorted(key for key, room in _room(conn, limits, now).items() if room > 0)


def sweep_held(
    conn: Connection, keys: list[str], *, now: datetime, worker_id: str | None
) -> list[ReadyStep]:
    """Let go of as many held steps of ``keys`` as each has room for; return them."""
    _lock(conn, sorted(keys), wait=True)
    limits = _pairs(conn, _HOLDING.where(ws.c.concurrency_key.in_(keys)))
    return let_go(conn, +_room(conn, limits, now), now=now, worker_id=worker_id)


def _room(conn: Connection, limits: dict[str, int], now: datetime) -> Counter[str]:
    if not limits:
        return Counter()
    taken = _pairs(conn, _TAKEN, keys=sorted(limits), now=now)
    return Counter({key: limit - taken.get(key, 0) for key, limit in limits.items()})


@dataclass(frozen=True)
class KeyLoad:
    """A concurrency key's attempts running now and steps it holds back."""

    key: str
    running: int
    held: int
    limit: int

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "running": self.running, "held": self.held, "limit": self.limit}


def running_per_key(conn: Connection, limit: int = 50) -> list[KeyLoad]:
    """The busiest keys (most running, then most held), at most ``limit`` of them."""
    rows = conn.execute(_PER_KEY, {"limit": limit}).all()
    return [KeyLoad(row[0], int(row[1]), int(row[2]), int(row[3])) for row in rows]


def _pairs(conn: Connection, statement: Any, **params: Any) -> dict[str, int]:
    """{key: number} from a statement that reads both."""
    return {row[0]: int(row[1]) for row in conn.execute(statement, params)}


def _lock(conn: Connection, keys: list[str], *, wait: bool) -> set[str]:
    """Take each key's advisory lock (PostgreSQL), in the global order; return the keys this
    transaction holds (``wait=False``: those that were free)."""
    if conn.dialect.name != "postgresql":
        return set(keys)
    if wait:
        conn.execute(_LOCK_KEYS, {"cls": _LOCK_CLASS, "keys": keys})
        return set(keys)
    return set(conn.execute(_TRY_KEYS, {"cls": _LOCK_CLASS, "keys": keys}).scalars())


def _hold(
    conn: Connection,
    held: dict[str, tuple[str, str, int]],
    running: Counter[str],
    *,
    now: datetime,
    worker_id: str | None,
) -> None:
    rows = conn.execute(_HOLD, {"ids": list(held), "now": now}).all()
    at = db_time(conn.dialect, now)
    insert_transitions(
        conn,
        [
            transition_row(
                row.step_uuid,
                held[row.step_uuid][0],
                WAITING,
                row.attempts,
                worker_id,
                at,
                f"held by concurrency key {held[row.step_uuid][1]}: "
                f"{running[held[row.step_uuid][1]]} running, limit {held[row.step_uuid][2]}",
            )
            for row in rows
        ],
    )


_NOW = bindparam("now", type_=ws.c.updated_at.type)
# The candidates with a concurrency key or a rate limit (most steps have neither).
_FLOW_OF = select(
    ws.c.step_uuid,
    ws.c.concurrency_key,
    ws.c.concurrency_limit,
    ws.c.rate_limit,
    ws.c.rate_units,
).where(
    ws.c.step_uuid.in_(bindparam("ids", expanding=True)),
    or_(ws.c.concurrency_key.is_not(None), ws.c.rate_limit.is_not(None)),
)
_RUNNING = (
    select(ws.c.concurrency_key, func.count())
    .where(ws.c.concurrency_key.in_(bindparam("keys", expanding=True)), ws.c.state == IN_PROGRESS)
    .group_by(ws.c.concurrency_key)
)
# Running, or due to run: what a key's room is counted against when the sweep lets go (a
# step not due yet, a delayed start or one waiting for tokens, does not take a slot now).
_TAKEN = (
    select(ws.c.concurrency_key, func.count())
    .where(
        ws.c.concurrency_key.in_(bindparam("keys", expanding=True)),
        or_(
            ws.c.state == IN_PROGRESS,
            and_(
                ws.c.state == ENQUEUED,
                ws.c.next_attempt_at <= bindparam("now", type_=ws.c.next_attempt_at.type),
            ),
        ),
    )
    .group_by(ws.c.concurrency_key)
)
# Keys with held steps, and the smallest limit among them (the strictest one decides). The
# condition is the held steps' partial index's, word for word, so both databases use it.
_HOLDING = (
    select(ws.c.concurrency_key, func.min(ws.c.concurrency_limit))
    .where(text(HELD_BY_KEY))
    .group_by(ws.c.concurrency_key)
)
_HOLDING_ANY = (
    select(ws.c.concurrency_key)
    .where(ws.c.concurrency_key.in_(bindparam("keys", expanding=True)), ws.c.state == WAITING)
    .distinct()
)
_HOLD = (
    update(ws)
    .where(ws.c.step_uuid.in_(bindparam("ids", expanding=True)), ws.c.state.in_(CLAIMABLE))
    .values(state=WAITING, next_attempt_at=None, updated_at=_NOW)
    .returning(ws.c.step_uuid, ws.c.attempts)
)
# A held step another transaction holds (``duplex cancel`` of its task, a claim's hold) is
# skipped, never waited for: letting go waits for no row (the sweep takes what is left).
_OLDEST_HELD = (
    select(ws.c.step_uuid)
    .where(ws.c.concurrency_key == bindparam("key"), ws.c.state == WAITING)
    .order_by(ws.c.priority.desc(), ws.c.created_at, ws.c.position, ws.c.step_uuid)
    .limit(bindparam("n"))
    .with_for_update(skip_locked=True)
)
_LET_GO = (
    update(ws)
    .where(ws.c.step_uuid.in_(bindparam("ids", expanding=True)), ws.c.state == WAITING)
    .values(state=ENQUEUED, next_attempt_at=_NOW, updated_at=_NOW)
    .returning(
        ws.c.step_uuid,
        ws.c.task_uuid,
        ws.c.attempts,
        ws.c.namespace,
        ws.c.priority,
        ws.c.kind,
        ws.c.concurrency_key,
    )
)
_PER_KEY = (
    select(
        ws.c.concurrency_key,
        func.sum(case((ws.c.state == IN_PROGRESS, 1), else_=0)),
        func.sum(case((ws.c.state == WAITING, 1), else_=0)),
        func.min(ws.c.concurrency_limit),
    )
    .where(ws.c.concurrency_key.is_not(None), ws.c.state.in_((IN_PROGRESS, WAITING)))
    .group_by(ws.c.concurrency_key)
    .order_by(text("2 DESC, 3 DESC"), ws.c.concurrency_key)
    .limit(bindparam("limit"))
)
# One statement, the locks taken in the order of the keys' hashes (the global order), so two
# transactions that need the same keys never wait for each other in a cycle.
_LOCK_KEYS = text(
    "SELECT pg_advisory_xact_lock(:cls, h) FROM"
    " (SELECT DISTINCT hashtext(k) AS h FROM unnest(CAST(:keys AS text[])) AS k ORDER BY h) AS o"
)
_TRY_KEYS = text(
    "SELECT k FROM unnest(CAST(:keys AS text[])) AS k"
    " WHERE pg_try_advisory_xact_lock(:cls, hashtext(k))"
)
