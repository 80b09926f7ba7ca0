"""Pausing a namespace or a template: its steps are not claimed until it is resumed.

A pause is a row of ``pauses``. Every claim, from the queue and in a commit (eager dispatch),
leaves out the steps of a paused namespace and those of tasks made from a paused template
(``NOT_PAUSED``, in both the candidates' query and the claim's guarded update, so a claim
statement that starts after the pause committed takes none of them). Steps already running
finish and commit as usual; their dependents are made ready but wait in the queue.

Both commands are idempotent, so scripts may repeat them: pausing what is paused keeps the
first pause (its time, operator and reason), resuming what is not paused changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, delete, insert, select

from duplex.errors import InputError
from duplex.storage.listen import notify_work
from duplex.storage.models import pauses, tasks, workflow_steps

NAMESPACE = "namespace"
TEMPLATE = "template"
KINDS = (NAMESPACE, TEMPLATE)

_NAME_MAX = 255  # the length of workflow_steps.namespace and tasks.name

ws = workflow_steps

# Both are uncorrelated subqueries, computed once per statement; with no pause they are empty.
# The template's is driven from ``pauses`` (a handful of rows) into the tasks of each paused
# name, through the (name, idempotency_key) index.
_PAUSED_NAMESPACES = select(pauses.c.name).where(pauses.c.kind == NAMESPACE)
_TASKS_OF_PAUSED_TEMPLATES = (
    select(tasks.c.task_uuid)
    .select_from(pauses)
    .join(tasks, tasks.c.name == pauses.c.name)
    .where(pauses.c.kind == TEMPLATE)
)

NOT_PAUSED: ColumnElement[bool] = and_(
    ws.c.namespace.not_in(_PAUSED_NAMESPACES),
    ws.c.task_uuid.not_in(_TASKS_OF_PAUSED_TEMPLATES),
)
"""True for a ``workflow_steps`` row that neither its namespace nor its template holds back."""


@dataclass(frozen=True, slots=True)
class Pause:
    """One paused namespace or template: who paused it, when and why."""

    kind: str
    name: str
    reason: str | None
    paused_by: str
    paused_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "reason": self.reason,
            "paused_by": self.paused_by,
            "paused_at": self.paused_at.isoformat(),
        }

    @property
    def label(self) -> str:
        """``namespace 'billing'`` or ``template 'nightly_sync'``."""
        return f"{self.kind} {self.name!r}"


def check_target(kind: str, name: str) -> None:
    """Raise ``InputError`` (one line) unless ``kind``/``name`` can be paused."""
    if kind not in KINDS:
        raise InputError(f"cannot pause a {kind!r}: only a namespace or a template")
    if not name.strip():
        raise InputError(f"the {kind} to pause or resume has an empty name")
    if len(name) > _NAME_MAX:
        raise InputError(f"{kind} name longer than {_NAME_MAX} characters: {name[:40]!r}...")


def pause(
    conn: Connection,
    *,
    kind: str,
    name: str,
    operator: str,
    now: datetime,
    reason: str | None = None,
) -> tuple[Pause, bool]:
    """Pause ``kind`` ``name``; return the pause in force and whether this call made it."""
    check_target(kind, name)
    existing = _find(conn, kind, name)
    if existing is not None:
        return existing, False
    new = Pause(kind, name, reason, operator, now)
    conn.execute(
        insert(pauses).values(
            kind=kind, name=name, reason=reason, paused_by=operator, paused_at=now
        )
    )
    return new, True


def resume(conn: Connection, *, kind: str, name: str) -> tuple[Pause | None, list[str]]:
    """Lift the pause of ``kind`` ``name``.

    Return the pause lifted (``None`` when there was none) and the namespaces whose workers
    should look again; on PostgreSQL they are notified at this transaction's commit.
    """
    check_target(kind, name)
    existing = _find(conn, kind, name)
    if existing is None:
        return None, []
    conn.execute(delete(pauses).where(pauses.c.kind == kind, pauses.c.name == name))
    if kind == NAMESPACE:
        namespaces = [name]
    else:
        query = select(tasks.c.namespace).where(tasks.c.name == name).distinct()
        namespaces = list(conn.execute(query).scalars())
    notify_work(conn, namespaces)
    return existing, namespaces


def list_pauses(conn: Connection) -> list[Pause]:
    """Every pause in force, oldest first."""
    rows = conn.execute(select(pauses).order_by(pauses.c.paused_at, pauses.c.kind, pauses.c.name))
    return [Pause(**row._mapping) for row in rows]


def pause_summary(paused: Pause, new: bool) -> str:
    """The one line ``duplex pause`` prints and the dashboard shows, for ``pause``'s answer."""
    if new:
        return f"paused {paused.label}: no new claims; running steps finish"
    since = paused.paused_at.isoformat(timespec="seconds")
    return f"{paused.label} was already paused (since {since}, by {paused.paused_by})"


def resume_summary(kind: str, name: str, lifted: Pause | None) -> str:
    """The one line ``duplex resume`` prints and the dashboard shows, for ``resume``'s answer."""
    label = f"{kind} {name!r}"
    return f"resumed {label}" if lifted else f"{label} was not paused; nothing to do"


def _find(conn: Connection, kind: str, name: str) -> Pause | None:
    row = conn.execute(
        select(pauses).where(pauses.c.kind == kind, pauses.c.name == name)
    ).one_or_none()
    return None if row is None else Pause(**row._mapping)
