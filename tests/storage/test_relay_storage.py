"""Outbox storage on both backends: retention (prune), lag figures, the NOTIFY ranges."""

from __future__ import annotations

import json
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import func, select, update

from duplex.clock import utcnow
from duplex.storage.db import Database
from duplex.storage.listen import EVENTS_CHANNEL, libpq_url, parse_payload
from duplex.storage.models import domain_events, tasks, workflow_step_transitions, workflow_steps
from duplex.storage.outbox import event_lag
from duplex.storage.retention import count_prunable, prune_batch
from tests.events.support import claim_all, commit, outcome, submit

de = domain_events


def finish(db: Database, n_steps: int, events_per_step: int = 1) -> str:
    task = submit(db, n_steps)
    steps = [s for s in claim_all(db) if s.task_uuid == task]
    commit(db, [outcome(s, events_per_step) for s in steps])
    return task


def age(db: Database, task: str, days: int) -> None:
    """Make a task and its events look ``days`` old."""
    then = utcnow() - timedelta(days=days)
    with db.write() as conn:
        conn.execute(update(tasks).where(tasks.c.task_uuid == task).values(completed_at=then))
        conn.execute(update(de).where(de.c.task_uuid == task).values(created_at=then))


def publish_all(db: Database, task: str) -> None:
    with db.write() as conn:
        conn.execute(update(de).where(de.c.task_uuid == task).values(published_at=utcnow()))


def rows(db: Database, table: object, task: str) -> int:
    with db.read() as conn:
        column = table.c.task_uuid  # type: ignore[attr-defined]
        return int(conn.execute(select(func.count()).where(column == task)).scalar_one())


def test_prune_deletes_only_what_it_may(db: Database) -> None:
    old_done = finish(db, 3)  # finished 10 days ago, all published: goes
    age(db, old_done, 10)
    publish_all(db, old_done)
    old_unpublished = finish(db, 2)  # finished long ago, one event still unpublished: stays
    age(db, old_unpublished, 10)
    publish_all(db, old_unpublished)
    with db.write() as conn:
        # The relay got as far as sequence 2: 3 and 4 wait.
        conn.execute(
            update(de)
            .where(de.c.task_uuid == old_unpublished, de.c.sequence >= 3)
            .values(published_at=None)
        )
    old_dead = finish(db, 1)  # a dead-lettered event: stays
    age(db, old_dead, 10)
    with db.write() as conn:
        conn.execute(update(de).where(de.c.task_uuid == old_dead).values(dead_lettered_at=utcnow()))
    recent = finish(db, 2)  # finished just now: stays
    publish_all(db, recent)
    running = submit(db, 2)  # unfinished, with old published events: only those go
    step, other = [s for s in claim_all(db) if s.task_uuid == running]
    commit(db, [outcome(step, 3)])
    age(db, running, 10)
    publish_all(db, running)

    cutoff = utcnow() - timedelta(days=1)
    with db.read() as conn:
        dry = count_prunable(conn, cutoff=cutoff)
    # old_done: 3 steps, 6 events; running: 4 old published events, the newest is kept;
    # old_unpublished: its published events 1 and 2 (later ones exist), not 3 and 4.
    assert (dry.tasks, dry.steps, dry.events) == (1, 3, 6 + 3 + 2)
    deleted = 0
    for _ in range(20):
        with db.write() as conn:
            batch = prune_batch(conn, cutoff=cutoff, limit=1)
        if batch.empty:
            break
        deleted += batch.events
    assert deleted == 11
    assert rows(db, tasks, old_done) == 0
    assert rows(db, workflow_steps, old_done) == 0
    assert rows(db, de, old_done) == 0
    with db.read() as conn:
        assert not conn.execute(
            select(func.count())
            .select_from(workflow_step_transitions)
            .join(workflow_steps, isouter=True)
            .where(workflow_steps.c.step_uuid.is_(None))
        ).scalar_one(), "transitions of deleted steps left behind"
    for kept in (old_unpublished, old_dead, recent, running):
        assert rows(db, tasks, kept) == 1
    assert rows(db, de, old_unpublished) == 2
    assert rows(db, de, old_dead) == 2
    assert rows(db, de, recent) == 4
    with db.read() as conn:
        left = list(conn.execute(select(de.c.sequence).where(de.c.task_uuid == running)).scalars())
    assert left == [4], "the newest event of a live task keeps its numbering going"
    # The numbering goes on after the newest event, not from 1 again.
    commit(db, [outcome(other, 1)])
    with db.read() as conn:
        assert (
            max(conn.execute(select(de.c.sequence).where(de.c.task_uuid == running)).scalars()) == 6
        )


def test_lag_counts_unpublished_dead_and_recent(db: Database) -> None:
    task = finish(db, 2)
    with db.write() as conn:
        ids = list(conn.execute(select(de.c.event_id).where(de.c.task_uuid == task)).scalars())
        conn.execute(update(de).where(de.c.event_id == ids[0]).values(published_at=utcnow()))
        conn.execute(update(de).where(de.c.event_id == ids[1]).values(dead_lettered_at=utcnow()))
    now = utcnow() + timedelta(seconds=2)
    with db.read() as conn:
        lag = event_lag(conn, now=now).as_json(now)
    assert lag["unpublished"] == 3
    assert lag["dead_lettered"] == 1
    assert lag["oldest_unpublished_age_s"] >= 2
    assert lag["published_per_s"] == round(1 / 60, 2)


@pytest.mark.postgres
def test_each_commit_notifies_the_new_sequence_ranges(postgres_db: Database) -> None:
    db = postgres_db
    first, second = submit(db, 2), submit(db, 1)
    steps = claim_all(db)
    with psycopg.connect(libpq_url(db.url), autocommit=True) as listener:
        listener.execute(f"LISTEN {EVENTS_CHANNEL}")
        commit(db, [outcome(s, 1) for s in steps if s.task_uuid == first])
        commit(db, [outcome(s, 2) for s in steps if s.task_uuid == second], rollback=True)
        commit(db, [outcome(s, 2) for s in steps if s.task_uuid == second])
        notes = []
        # Other processes may share the database and commit meanwhile: only this test's two
        # tasks are counted.
        for note in listener.notifies(timeout=5):
            if any(r["task_uuid"] in (first, second) for r in json.loads(note.payload)):
                notes.append(note.payload)
            if len(notes) == 2:
                break
    assert [json.loads(n) for n in notes] == [
        [{"task_uuid": first, "first": 1, "last": 4}],
        [{"task_uuid": second, "first": 1, "last": 3}],
    ], "one NOTIFY per commit, none for the rolled-back one"
    assert parse_payload(notes[0])[0].last == 4
    assert parse_payload("not json") == []
