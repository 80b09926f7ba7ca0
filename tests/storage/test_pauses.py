"""Pausing a namespace or a template (``duplex.storage.pauses``), on SQLite and PostgreSQL.

No claim, from the queue or inside a commit (eager dispatch), takes a step of a paused
namespace or of a task made from a paused template; the steps behind a paused one are not held
up by it; resuming makes them claimable again. A stateful hypothesis test drives random
submissions, pauses, resumes, claims and commits against real SQL.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule
from sqlalchemy import select

from duplex.errors import InputError
from duplex.settings import DatabaseSettings
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.listen import WORK_CHANNEL, libpq_url
from duplex.storage.models import tasks, workflow_steps
from duplex.storage.pauses import NAMESPACE, TEMPLATE, list_pauses, pause, resume
from tests.conftest import sqlite_database
from tests.storage.support import commit_and_claim, fan, ok, submit

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
OPERATOR = "operator:tester"


def pause_(db: Database, kind: str, name: str, reason: str | None = None) -> bool:
    with db.write() as conn:
        return pause(conn, kind=kind, name=name, operator=OPERATOR, now=T0, reason=reason)[1]


def resume_(db: Database, kind: str, name: str) -> list[str]:
    with db.write() as conn:
        return resume(conn, kind=kind, name=name)[1]


def single(name: str, namespace: str) -> str:
    return f'name = "{name}"\nnamespace = "{namespace}"\n[[steps]]\nname = "s"\nhandler = "t.h"\n'


def claim_names(db: Database, namespaces: tuple[str, ...], now: datetime) -> list[str]:
    """Claim everything claimable; return the template names of the claimed steps' tasks."""
    with db.write() as conn:
        claimed = claim_ready_steps(conn, worker_id="w1", namespaces=namespaces, limit=100, now=now)
        ids = [c.task_uuid for c in claimed]
        query = select(tasks.c.task_uuid, tasks.c.name).where(tasks.c.task_uuid.in_(ids))
        names = {row.task_uuid: row.name for row in conn.execute(query)}
    return sorted(names[task] for task in ids)


def test_a_paused_namespace_is_not_claimed_and_others_are(db: Database) -> None:
    submit(db, single("a", "billing"), T0)
    submit(db, single("b", "mail"), T0)
    assert pause_(db, NAMESPACE, "billing", "card processor down") is True

    assert claim_names(db, ("billing", "mail"), T0 + timedelta(seconds=1)) == ["b"]
    assert claim_names(db, ("billing", "mail"), T0 + timedelta(seconds=2)) == []

    assert resume_(db, NAMESPACE, "billing") == ["billing"]
    assert claim_names(db, ("billing", "mail"), T0 + timedelta(seconds=3)) == ["a"]


def test_steps_behind_a_paused_template_are_claimed_in_its_namespace(db: Database) -> None:
    # The paused template's steps are the oldest of the queue: a claim that only read the
    # first ``limit`` candidates and then dropped them would claim nothing, forever.
    for i in range(5):
        submit(db, single("nightly", "default"), T0 + timedelta(milliseconds=i))
    submit(db, single("urgent", "default"), T0 + timedelta(seconds=1))
    pause_(db, TEMPLATE, "nightly")

    with db.write() as conn:
        claimed = claim_ready_steps(
            conn, worker_id="w1", namespaces=("default",), limit=1, now=T0 + timedelta(seconds=2)
        )
    assert len(claimed) == 1
    assert claim_names(db, ("default",), T0 + timedelta(seconds=3)) == []

    assert resume_(db, TEMPLATE, "nightly") == ["default"]
    assert claim_names(db, ("default",), T0 + timedelta(seconds=4)) == ["nightly"] * 5


def test_a_commit_does_not_claim_dependents_of_a_paused_namespace(db: Database) -> None:
    task = submit(db, fan(2, namespace="default"), T0)
    with db.write() as conn:
        (root,) = claim_ready_steps(conn, worker_id="w1", namespaces=("default",), limit=1, now=T0)
    # Paused while the root runs: its result commits, its dependents become ready but wait.
    pause_(db, NAMESPACE, "default")
    t1 = T0 + timedelta(seconds=1)
    report, claimed = commit_and_claim(db, [ok(root, t1, {})], t1, limit=2)

    assert report.enqueued == 2
    assert claimed == []
    with db.read() as conn:
        states = conn.execute(
            select(workflow_steps.c.state).where(
                workflow_steps.c.task_uuid == task, workflow_steps.c.name != "root"
            )
        ).scalars()
        assert sorted(states) == ["enqueued", "enqueued"]


def test_pause_and_resume_are_idempotent_and_listed(db: Database) -> None:
    assert pause_(db, NAMESPACE, "billing", "first") is True
    assert pause_(db, NAMESPACE, "billing", "second") is False
    assert pause_(db, TEMPLATE, "billing") is True  # another kind, another pause
    with db.read() as conn:
        listed = [(p.kind, p.name, p.reason) for p in list_pauses(conn)]
    assert sorted(listed) == [(NAMESPACE, "billing", "first"), (TEMPLATE, "billing", None)]

    assert resume_(db, NAMESPACE, "billing") == ["billing"]
    with db.write() as conn:
        assert resume(conn, kind=NAMESPACE, name="billing") == (None, [])


@pytest.mark.parametrize(
    ("kind", "name", "message"),
    [
        ("queue", "x", "only a namespace or a template"),
        (NAMESPACE, "  ", "empty name"),
        (TEMPLATE, "n" * 256, "longer than 255"),
    ],
)
def test_a_bad_target_is_one_clear_error_and_writes_nothing(
    db: Database, kind: str, name: str, message: str
) -> None:
    with pytest.raises(InputError, match=message), db.write() as conn:
        pause(conn, kind=kind, name=name, operator=OPERATOR, now=T0)
    with db.read() as conn:
        assert list_pauses(conn) == []


def test_resume_wakes_the_namespaces_workers_on_postgres(postgres_db: Database) -> None:
    submit(postgres_db, single("nightly", "reports"), T0)
    pause_(postgres_db, TEMPLATE, "nightly")
    with psycopg.connect(libpq_url(postgres_db.url), autocommit=True) as listener:
        listener.execute(f"LISTEN {WORK_CHANNEL}")
        resume_(postgres_db, TEMPLATE, "nightly")
        # Delivered at the resume's commit, which has returned: it is here, or never.
        received = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert received == ["reports"]


# --- a stateful property over real SQL ------------------------------------------------------

_MIGRATED = tempfile.TemporaryDirectory()


def _migrated_sqlite() -> Path:
    """A freshly migrated SQLite file, made once per test session and copied per example."""
    path = Path(_MIGRATED.name) / "migrated.db"
    if not path.exists():
        sqlite_database(path).dispose()
    return path


NAMESPACES = ("ns_a", "ns_b")
TEMPLATES = ("t1", "t2")


class PauseMachine(RuleBasedStateMachine):
    """Random submissions, pauses, resumes, claims and commits on one SQLite database.

    Pauses fall between a claim and its commit, so commits claim dependents (eager dispatch)
    of what was paused meanwhile. Checked after every claim, from the queue or in a commit:
    nothing claimed belongs to a namespace or template paused at that moment. At the end
    (``drain``): once every pause is lifted, every step runs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir: tempfile.TemporaryDirectory[str] | None = None
        self.paused: set[tuple[str, str]] = set()
        self.now = T0
        self.task_names: dict[str, tuple[str, str]] = {}  # task -> (namespace, template)
        self.running: list[Any] = []  # claimed, result not yet committed

    @initialize()
    def open_database(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        path = Path(self.dir.name) / "pauses.db"
        shutil.copyfile(_migrated_sqlite(), path)  # migrating per example would cost most
        self.db = Database(DatabaseSettings(url=f"sqlite:///{path}"))

    def teardown(self) -> None:
        if self.dir is None:
            return
        try:
            self.drain()
        finally:
            self.db.dispose()
            self.dir.cleanup()

    def tick(self) -> datetime:
        self.now += timedelta(milliseconds=10)
        return self.now

    @rule(
        tasks=st.lists(
            st.tuples(st.sampled_from(NAMESPACES), st.sampled_from(TEMPLATES), st.integers(0, 2)),
            min_size=1,
            max_size=4,
        )
    )
    def submit_tasks(self, tasks: list[tuple[str, str, int]]) -> None:
        for namespace, template, children in tasks:
            task = submit(self.db, fan(children, namespace=namespace, name=template), self.tick())
            self.task_names[task] = (namespace, template)

    @rule(kind=st.sampled_from((NAMESPACE, TEMPLATE)), index=st.integers(0, 1))
    def pause_one(self, kind: str, index: int) -> None:
        name = (NAMESPACES if kind == NAMESPACE else TEMPLATES)[index]
        pause_(self.db, kind, name)
        self.paused.add((kind, name))
        self.check_recorded()

    @rule(kind=st.sampled_from((NAMESPACE, TEMPLATE)), index=st.integers(0, 1))
    def resume_one(self, kind: str, index: int) -> None:
        name = (NAMESPACES if kind == NAMESPACE else TEMPLATES)[index]
        resume_(self.db, kind, name)
        self.paused.discard((kind, name))
        self.check_recorded()

    @rule(limit=st.integers(1, 5))
    def claim(self, limit: int) -> None:
        with self.db.write() as conn:
            claimed = claim_ready_steps(
                conn, worker_id="w1", namespaces=NAMESPACES, limit=limit, now=self.tick()
            )
        self.check(claimed)
        self.running.extend(claimed)

    @rule(
        eager=st.integers(0, 3),
        pause_first=st.sampled_from(
            [None, (NAMESPACE, 0), (NAMESPACE, 1), (TEMPLATE, 0), (TEMPLATE, 1)]
        ),
    )
    def commit_running(self, eager: int, pause_first: tuple[str, int] | None) -> None:
        """Commit what runs and claim dependents in the commit; ``pause_first``: pause
        something while it runs (the moment an eager claim must respect)."""
        if not self.running:
            return
        if pause_first is not None:
            self.pause_one(*pause_first)
        now = self.tick()
        outcomes = [ok(step, now, {}) for step in self.running]
        _, more = commit_and_claim(self.db, outcomes, now, limit=eager, namespaces=NAMESPACES)
        self.check(more)
        self.running = more

    def check(self, claimed: list[Any]) -> None:
        for step in claimed:
            namespace, template = self.task_names[step.task_uuid]
            assert (NAMESPACE, namespace) not in self.paused, f"claimed in paused {namespace}"
            assert (TEMPLATE, template) not in self.paused, f"claimed from paused {template}"

    def check_recorded(self) -> None:
        with self.db.read() as conn:
            assert {(p.kind, p.name) for p in list_pauses(conn)} == self.paused

    def drain(self) -> None:
        if self.running:
            now = self.tick()
            commit_and_claim(self.db, [ok(s, now, {}) for s in self.running], now, limit=0)
        for kind, name in list(self.paused):
            resume_(self.db, kind, name)
        self.paused.clear()
        for _ in range(1000):
            now = self.tick()
            with self.db.write() as conn:
                claimed = claim_ready_steps(
                    conn, worker_id="w1", namespaces=NAMESPACES, limit=50, now=now
                )
            if not claimed:
                break
            commit_and_claim(self.db, [ok(s, now, {}) for s in claimed], now, limit=0)
        with self.db.read() as conn:
            states = set(conn.execute(select(workflow_steps.c.state)).scalars())
        assert states <= {"complete"}, states


TestPauses = PauseMachine.TestCase
TestPauses.settings = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
