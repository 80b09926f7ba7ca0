"""What a due schedule does now: fire, skip, hold one fire back, or record fires as missed.

Plain logic on the instant given; ``duplex.storage.schedules.fire_due`` reads the rows,
asks ``plan`` and writes the answer in the same transaction (docs/time.md, Schedules).

One plan acts on at most one fire time (the firer calls again while fires are due), so a
schedule that fell behind catches up one fire time per transaction, and each fire time is
judged against the state its predecessor left: under ``skip`` the first catch-up fire
creates a task and the ones after it are skipped while that task runs.

* **Catch-up.** A fire time more than the catch-up window behind ``now`` is *missed*: the
  fire times from ``next_fire_at`` up to the window are recorded as one missed range and
  the schedule moves on to the first fire time inside the window.
* **Overlap**, when the schedule's previous task has not finished (complete, error or
  cancelled): ``skip`` records the fire time as skipped; ``buffer_one`` holds it back and
  fires it as soon as the previous task ends (a further fire while one is held back is
  skipped); ``allow`` fires anyway.

``cancel_previous`` is not offered: a task's running attempts cannot be stopped (threads
cannot be killed, docs/architecture.md), so "cancel the previous run, then start the next"
would start the next while the previous still runs its handlers, which is ``allow`` with a
cancelled task's steps lost, not the exclusive run the policy promises.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from duplex.schedules.spec import ScheduleSpec

# How many missed fire times are counted one by one; beyond it the count says "at least".
MISSED_COUNT_CAP = 100_000


@dataclass(frozen=True, slots=True)
class DueSchedule:
    """What the plan needs to know of one schedule row."""

    name: str
    spec: ScheduleSpec
    overlap: str
    catchup: timedelta
    next_fire_at: datetime
    buffered_fire_at: datetime | None
    previous_run_open: bool


@dataclass(frozen=True, slots=True)
class MissedFires:
    """Consecutive fire times missed by more than the catch-up window."""

    first: datetime
    count: int  # MISSED_COUNT_CAP means at least that many

    def describe(self, window: timedelta) -> str:
        many = f"{self.count}+" if self.count >= MISSED_COUNT_CAP else str(self.count)
        return f"{many} fire time(s) from {fire_time_text(self.first)} missed by more than {window}"


@dataclass(frozen=True, slots=True)
class FirePlan:
    """The plan for one schedule now: at most one fire time acted on."""

    next_fire_at: datetime
    buffered_fire_at: datetime | None
    fire_at: datetime | None = None  # create a task for this fire time
    skipped: datetime | None = None  # record this fire time as skipped (overlap)
    missed: MissedFires | None = None

    @property
    def changes_anything(self) -> bool:
        return self.fire_at is not None or self.skipped is not None or self.missed is not None


def plan(due: DueSchedule, now: datetime) -> FirePlan:
    """Decide what ``due`` does at ``now`` (see the module docstring)."""
    spec = due.spec
    buffered = due.buffered_fire_at
    if buffered is not None and not due.previous_run_open:
        return FirePlan(due.next_fire_at, None, fire_at=buffered)
    fire_at = due.next_fire_at
    if fire_at > now:
        return FirePlan(fire_at, buffered)
    missed = None
    cutoff = now - due.catchup
    if fire_at < cutoff:
        count, fire_at = spec.fires_between(fire_at, cutoff, cap=MISSED_COUNT_CAP)
        missed = MissedFires(due.next_fire_at, count)
        if fire_at > now:
            return FirePlan(fire_at, buffered, missed=missed)
    following = spec.next_after(fire_at)
    if not due.previous_run_open or due.overlap == "allow":
        return FirePlan(following, buffered, fire_at=fire_at, missed=missed)
    if due.overlap == "buffer_one" and buffered is None:
        return FirePlan(following, fire_at, missed=missed)
    return FirePlan(following, buffered, skipped=fire_at, missed=missed)


def fire_time_text(moment: datetime) -> str:
    """A fire time in ISO 8601 UTC, ``Z``-suffixed; milliseconds only when there are some."""
    moment = moment.astimezone(UTC)
    spec = "milliseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def idempotency_key(schedule: str, fire_at: datetime) -> str:
    """The fired task's idempotency key: ``schedule:NAME@<fire time ISO 8601 UTC>``."""
    return f"schedule:{schedule}@{fire_time_text(fire_at)}"


def first_fire_after(spec: ScheduleSpec, now: datetime) -> datetime:
    """A new (or resumed) schedule's first fire time: the first one after ``now``."""
    return spec.next_after(now)
