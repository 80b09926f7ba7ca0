"""Storage test tools: worker rows, and a task driven by hand through the functions the actors
call (claim, commit), so that a test sets up exactly the moment it is about.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select

from duplex.clock import utcnow
from duplex.commit.retry import RetryPolicy
from duplex.messages import ClaimedStep, StepFailure, StepOutcome
from duplex.storage.claims import claim_dependents, claim_ready_steps
from duplex.storage.db import Database
from duplex.storage.models import tasks, workers, workflow_step_transitions, workflow_steps
from duplex.storage.operations import OperatorReport
from duplex.storage.results import CommitReport, commit_outcomes
from duplex.storage.submission import create_task
from duplex.templates import parse_template

# The host of the rows ``add_worker`` writes. The recoveries under test ask as another host
# (a worker as ``socket.gethostname()``), so only the heartbeat rule applies to these rows, never
# the same-host "process gone" check; a test that asks as this host
# (``dead_local_workers(hostname=WORKER_HOST)``) sees them as local.
WORKER_HOST = "test-host"


def add_worker(
    db: Database, worker_id: str, heartbeat_at: datetime, stopped_at: datetime | None = None
) -> None:
    """Write a ``workers`` row, pid 1 on ``WORKER_HOST``, last beating at ``heartbeat_at``."""
    with db.write() as conn:
        conn.execute(
            insert(workers).values(
                worker_id=worker_id,
                hostname=WORKER_HOST,
                pid=1,
                started_at=heartbeat_at,
                heartbeat_at=heartbeat_at,
                stopped_at=stopped_at,
                stats={},
            )
        )


OPERATOR = "operator:tester"
POLICY = RetryPolicy(base_ms=0, multiplier=1.0, max_ms=0, jitter=0.0)
# Retries due one second after the first failure, then two...: a retry is not due at once.
BACKOFF_POLICY = RetryPolicy(base_ms=1000, multiplier=2.0, max_ms=60_000, jitter=0.0)

# a -> b -> c, and x on its own.
TEMPLATE = """
name = "ops"
[[steps]]
name = "a"
handler = "t.h"
[[steps]]
name = "b"
handler = "t.h"
depends_on = ["a"]
max_attempts = 2
[[steps]]
name = "c"
handler = "t.h"
depends_on = ["b"]
[[steps]]
name = "x"
handler = "t.h"
"""

# Two parents: d waits for both.
FAN_IN = """
name = "fan_in"
[[steps]]
name = "p"
handler = "t.h"
[[steps]]
name = "q"
handler = "t.h"
[[steps]]
name = "d"
handler = "t.h"
depends_on = ["p", "q"]
"""


class Flow:
    """A task driven step by step through claims and commits."""

    def __init__(self, db: Database, template: str = TEMPLATE) -> None:
        self.db = db
        self.namespace = f"ns-{uuid.uuid4().hex[:8]}"
        text = template.replace('name = "ops"', f'name = "ops"\nnamespace = "{self.namespace}"')
        text = text.replace('name = "fan_in"', f'name = "fan_in"\nnamespace = "{self.namespace}"')
        with db.write() as conn:
            self.task = create_task(conn, parse_template(text), {"k": 1}, now=utcnow())

    def claim(self, *names: str) -> list[ClaimedStep]:
        """Claim the ready steps; assert they are exactly ``names``."""
        with self.db.write() as conn:
            claimed = claim_ready_steps(
                conn, worker_id="w1", namespaces=[self.namespace], limit=100, now=utcnow()
            )
        assert sorted(s.name for s in claimed) == sorted(names)
        return claimed

    def run(self, step: ClaimedStep, kind: str = "success") -> CommitReport:
        """Commit an outcome of ``kind`` (success, retryable, permanent) for a claimed step."""
        now = utcnow()
        if kind == "success":
            outcome = StepOutcome(step, now, now, result={"from": step.name})
        else:
            failure = StepFailure(f"{kind}_error", f"{step.name} failed", kind == "retryable")
            outcome = StepOutcome(step, now, now, failure=failure)
        with self.db.write() as conn:
            return commit_outcomes(conn, [outcome], policy=POLICY, now=now, rng=random.Random(0))

    def uuid_of(self, name: str) -> str:
        with self.db.read() as conn:
            return str(
                conn.execute(
                    select(workflow_steps.c.step_uuid).where(
                        workflow_steps.c.task_uuid == self.task, workflow_steps.c.name == name
                    )
                ).scalar_one()
            )

    def states(self) -> dict[str, str]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(workflow_steps.c.name, workflow_steps.c.state).where(
                    workflow_steps.c.task_uuid == self.task
                )
            )
            return dict(rows.all())

    def step(self, name: str) -> Any:
        with self.db.read() as conn:
            return conn.execute(
                select(workflow_steps).where(
                    workflow_steps.c.task_uuid == self.task, workflow_steps.c.name == name
                )
            ).one()

    def task_row(self) -> Any:
        with self.db.read() as conn:
            return conn.execute(select(tasks).where(tasks.c.task_uuid == self.task)).one()

    def transitions(self, name: str) -> list[Any]:
        with self.db.read() as conn:
            return list(
                conn.execute(
                    select(workflow_step_transitions)
                    .where(workflow_step_transitions.c.step_uuid == self.uuid_of(name))
                    .order_by(workflow_step_transitions.c.id)
                )
            )

    def operate(
        self, operation: Callable[..., OperatorReport], target: str, reason: str | None = None
    ) -> OperatorReport:
        with self.db.write() as conn:
            return operation(conn, target, operator=OPERATOR, now=utcnow(), reason=reason)


# --- a root and its dependents, claimed from the queue or in the commit (eager dispatch) ----


def fan(children: int, namespace: str = "default", name: str = "fan") -> str:
    """A root with ``children`` dependents."""
    steps = '[[steps]]\nname = "root"\nhandler = "t.root"\n' + "".join(
        f'[[steps]]\nname = "c{i}"\nhandler = "t.c"\ndepends_on = ["root"]\n'
        for i in range(children)
    )
    return f'name = "{name}"\nnamespace = "{namespace}"\n{steps}'


def submit(db: Database, template: str, now: datetime) -> str:
    with db.write() as conn:
        return create_task(conn, parse_template(template), {"order": 7}, now=now)


def claim(db: Database, now: datetime, worker: str = "w1", **kw: Any) -> list[ClaimedStep]:
    namespaces = kw.pop("namespaces", ("default",))
    with db.write() as conn:
        return claim_ready_steps(
            conn, worker_id=worker, namespaces=namespaces, limit=kw.pop("limit", 10), now=now
        )


def ok(step: ClaimedStep, now: datetime, result: dict[str, Any]) -> StepOutcome:
    return StepOutcome(step, now, now, result=result)


def commit_and_claim(
    db: Database,
    outcomes: list[StepOutcome],
    now: datetime,
    *,
    limit: int,
    worker: str = "w1",
    namespaces: tuple[str, ...] = ("default",),
) -> tuple[CommitReport, list[ClaimedStep]]:
    """Commit ``outcomes`` and claim dependents they made ready, in one transaction."""
    with db.write() as conn:
        report = commit_outcomes(
            conn, outcomes, policy=BACKOFF_POLICY, now=now, rng=random.Random(0)
        )
        claimed = claim_dependents(
            conn, report.ready, worker_id=worker, namespaces=namespaces, limit=limit, now=now
        )
    return report, claimed


def starts_in_windows(times: Sequence[datetime], period: timedelta) -> int:
    """The most starts in any half-open window of one period (one starting at a start)."""
    ordered = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(ordered):
        while ordered[first] <= at - period:
            first += 1
        most = max(most, last - first + 1)
    return most
