"""A wait step under any order of signals (ids from a small pool, so that repeats happen), its
start, and the clock running past its timeout: it ends one way only, with the payload of the
first signal accepted or as ``wait_timeout``; its dependent becomes ready once at most; a
refused signal writes nothing. SQLite, for speed; the clock is an argument, never slept on."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy import select

from duplex.clock import utcnow
from duplex.errors import WAIT_TIMEOUT, InputError, TransitionError
from duplex.messages import StepOutcome
from duplex.storage.claims import claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.models import step_signals, workflow_step_transitions
from duplex.storage.results import commit_outcomes
from duplex.storage.signals import COMPLETED, DUPLICATE, STORED, send_signal, signal_result
from duplex.storage.waits import end_due_waits, find_due_waits
from tests.conftest import sqlite_database
from tests.dynamic.support import snapshot
from tests.storage.support import OPERATOR, POLICY, Flow

# prepare -> approval (waits for "approved", at most a minute) -> ship.
TEMPLATE = """
name = "ops"
[[steps]]
name = "prepare"
handler = "t.h"
[[steps]]
name = "approval"
kind = "wait"
signal = "approved"
timeout_ms = 60000
depends_on = ["prepare"]
[[steps]]
name = "ship"
handler = "t.h"
depends_on = ["approval"]
"""
TIMEOUT = timedelta(minutes=1)
PAYLOADS = st.one_of(
    st.none(),
    st.integers(-5, 5),
    st.lists(st.booleans(), max_size=2),
    st.dictionaries(st.sampled_from("abc"), st.integers(0, 3), max_size=2),
)
# None: a new id each time; the others repeat.
SIGNAL_IDS = st.sampled_from([None, "s1", "s2", "s3"])


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    db = sqlite_database(Path(tmp_path_factory.mktemp("signals")) / "signals.db")
    yield db
    db.dispose()


class WaitMachine(RuleBasedStateMachine):
    db: Database

    def __init__(self) -> None:
        super().__init__()
        self.flow = Flow(self.db, TEMPLATE)
        self.now = utcnow()
        # The model: the wait's state, when it times out, the ids received and their payloads,
        # the signal stored for a wait not yet started, and the result it should end with.
        self.state = "pending"
        self.until: Any = None
        self.received: dict[str, Any] = {}
        self.stored: str | None = None
        self.result: Any = None
        self.first_id: str | None = None
        self.prepared = False

    @rule(signal_id=SIGNAL_IDS, payload=PAYLOADS, name=st.sampled_from(["approved", "other"]))
    def send(self, signal_id: str | None, payload: Any, name: str) -> None:
        before = snapshot(self.db, self.flow.task)
        try:
            with self.db.write() as conn:
                report = send_signal(
                    conn,
                    self.flow.task,
                    name,
                    payload,
                    signal_id=signal_id,
                    sent_by=OPERATOR,
                    now=self.now,
                )
        except (InputError, TransitionError) as exc:
            self._refused(exc, before, signal_id, name)
            return
        if signal_id is not None and signal_id in self.received:
            assert report.outcome == DUPLICATE
            assert snapshot(self.db, self.flow.task) == before, "a repeated id wrote something"
            return
        assert name == "approved"
        self.received[report.signal_id] = payload
        if self.state == "pending":
            assert report.outcome == STORED
            self.stored = report.signal_id
        else:
            assert self.state == "waiting"
            assert report.outcome == COMPLETED
            self._complete(report.signal_id, payload)

    @rule()
    def run_prepare(self) -> None:
        """Claim and commit the wait's parent at the model's time: the wait starts."""
        if self.prepared:
            return
        self.prepared = True
        with self.db.write() as conn:
            (step,) = claim_ready_steps(
                conn, worker_id="w1", namespaces=[self.flow.namespace], limit=10, now=self.now
            )
            assert step.name == "prepare"
            outcome = StepOutcome(step, self.now, self.now, result={})
            commit_outcomes(conn, [outcome], policy=POLICY, now=self.now, rng=random.Random(0))
        if self.stored is not None:
            self._complete(self.stored, self.received[self.stored])
        else:
            self.state, self.until = "waiting", self.now + TIMEOUT

    @rule(ms=st.integers(0, 90_000))
    def sweep_later(self, ms: int) -> None:
        self.now += timedelta(milliseconds=ms)
        with self.db.read() as conn:
            due = find_due_waits(conn, now=self.now)
        with self.db.write() as conn:
            end_due_waits(conn, due, now=self.now, worker_id="sweeper")
        if self.state == "waiting" and self.until <= self.now:
            self.state = "error"

    def _refused(self, refused: Exception, before: Any, signal_id: str | None, name: str) -> None:
        assert "\n" not in str(refused)
        assert snapshot(self.db, self.flow.task) == before, "a refused signal wrote something"
        if signal_id in self.received:  # only "approved" is ever received
            assert name != "approved", "a repeated id was refused"
            return
        expected_refusal = (
            name != "approved"
            or self.state not in ("pending", "waiting")
            or (self.state == "pending" and self.stored is not None)
        )
        assert expected_refusal, f"refused: {refused}"

    def _complete(self, signal_id: str, payload: Any) -> None:
        self.state, self.result, self.first_id = "complete", signal_result(payload), signal_id

    @invariant()
    def the_wait_ends_one_way_only(self) -> None:
        step = self.flow.step("approval")
        assert step.state == self.state
        ends = [
            t.to_state
            for t in self.flow.transitions("approval")
            if t.to_state in ("complete", "error")
        ]
        assert ends == ([self.state] if self.state in ("complete", "error") else [])
        if self.state == "complete":
            assert step.results == self.result
            assert step.error is None
        if self.state == "error":
            assert step.error["error_type"] == WAIT_TIMEOUT
            assert step.results is None

    @invariant()
    def at_most_one_signal_is_used_the_first_accepted(self) -> None:
        with self.db.read() as conn:
            used = conn.execute(
                select(step_signals.c.signal_id).where(
                    step_signals.c.task_uuid == self.flow.task, step_signals.c.used_at.isnot(None)
                )
            ).all()
        assert [row.signal_id for row in used] == ([self.first_id] if self.first_id else [])

    @invariant()
    def the_dependent_becomes_ready_once(self) -> None:
        ship = self.flow.uuid_of("ship")
        with self.db.read() as conn:
            moves = conn.execute(
                select(workflow_step_transitions.c.id).where(
                    workflow_step_transitions.c.step_uuid == ship,
                    workflow_step_transitions.c.from_state == "pending",
                    workflow_step_transitions.c.to_state == "enqueued",
                )
            ).all()
        assert len(moves) == (1 if self.state == "complete" else 0)
        assert self.flow.states()["ship"] == ("enqueued" if self.state == "complete" else "pending")


def test_a_wait_ends_once_whatever_the_order_of_signals_start_and_time(
    sqlite_db: Database,
) -> None:
    WaitMachine.db = sqlite_db
    run_state_machine_as_test(
        WaitMachine,
        settings=settings(
            max_examples=100,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
