"""IntakeCredits: the worker never claims more than it can run (plus the prefetch window).

Dependents claimed by commits (eager dispatch) count against the same credits: the intake may
have claimed on the credits of the parents they replace before it heard of them, so the worker
may hold up to that many more, and then claims nothing until enough slots free.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from duplex.intake.credits import IntakeCredits
from duplex.intake.prefetch import claim_batch


def test_slots_must_be_positive() -> None:
    with pytest.raises(ValueError, match="slots"):
        IntakeCredits(0)
    with pytest.raises(ValueError, match="max_prefetch"):
        IntakeCredits(1, -1)


def test_first_claim_takes_the_whole_capacity_even_without_a_signal() -> None:
    credits = IntakeCredits(5)
    assert credits.available == 5
    assert credits.next_claim(work_signalled=False) == 5
    assert credits.claim_in_flight
    assert credits.available == 0


def test_only_one_claim_in_flight() -> None:
    credits = IntakeCredits(5)
    assert credits.next_claim(work_signalled=True) == 5
    credits.freed(2)  # nothing was running; the cap keeps this honest
    assert credits.next_claim(work_signalled=True) == 0
    credits.claimed(5, 5)
    assert not credits.claim_in_flight


def test_unclaimed_credits_come_back() -> None:
    credits = IntakeCredits(5)
    assert credits.next_claim(work_signalled=True) == 5
    credits.claimed(5, 2)
    assert credits.available == 3
    assert not credits.backlog_likely
    # A short claim means the queue is drained: wait for a signal before claiming again.
    assert credits.next_claim(work_signalled=False) == 0
    assert credits.next_claim(work_signalled=True) == 3


def test_full_claim_means_claim_again_as_soon_as_capacity_frees() -> None:
    credits = IntakeCredits(3)
    assert credits.next_claim(work_signalled=True) == 3
    credits.claimed(3, 3)
    assert credits.backlog_likely
    assert credits.next_claim(work_signalled=False) == 0  # nothing free
    credits.freed()
    assert credits.next_claim(work_signalled=False) == 1


def test_the_window_starts_at_one_step_per_slot() -> None:
    credits = IntakeCredits(4, 100)
    assert credits.capacity == 104
    assert credits.prefetch == 4
    assert credits.next_claim(work_signalled=True) == 8


def test_a_claim_waits_for_half_the_window_free() -> None:
    credits = IntakeCredits(2, 8, prefetch=8)
    assert credits.next_claim(work_signalled=True) == 10
    credits.claimed(10, 10)
    credits.freed(3)
    assert credits.next_claim(work_signalled=True) == 0
    credits.freed(1)
    assert credits.next_claim(work_signalled=False) == 4


def test_a_smaller_window_holds_its_unused_credits_back() -> None:
    credits = IntakeCredits(2, 100, prefetch=100)
    assert credits.next_claim(work_signalled=True) == 102
    credits.claimed(102, 102)
    credits.resize(4)  # the handlers turned slow
    credits.freed(100)  # 2 steps still held: only slots + 4 may be claimed in all
    assert credits.next_claim(work_signalled=True) == 4
    credits.claimed(4, 4)
    credits.resize(500)  # never past the ceiling
    assert credits.prefetch == 100


def test_freed_never_exceeds_capacity_and_the_excess_shows() -> None:
    credits = IntakeCredits(4)
    credits.freed(100)
    assert credits.available == 4
    assert credits.excess == 100


def test_steps_claimed_by_commits_hold_credits_until_they_end() -> None:
    credits = IntakeCredits(3)
    assert credits.next_claim(work_signalled=True) == 3
    credits.claimed(3, 3)
    credits.freed(2)  # two parents ended; their credits are back...
    credits.claimed_eagerly(2)  # ...and their commit carried on with two dependents
    assert credits.available == 0
    assert credits.next_claim(work_signalled=True) == 0
    credits.freed(1)
    assert credits.next_claim(work_signalled=True) == 1
    credits.claimed(1, 1)
    assert credits.excess == 0


def test_claims_the_intake_made_before_it_heard_of_eager_ones_are_paid_back_first() -> None:
    credits = IntakeCredits(2)
    assert credits.next_claim(work_signalled=True) == 2
    credits.claimed(2, 2)
    credits.freed(2)
    assert credits.next_claim(work_signalled=False) == 2  # before it heard of the commit
    credits.claimed(2, 2)
    credits.claimed_eagerly(2)  # the commit had claimed two dependents: 4 held, 2 slots
    assert credits.available == -2
    credits.freed(2)
    assert credits.next_claim(work_signalled=True) == 0  # the overshoot is paid back first
    credits.freed(1)
    assert credits.next_claim(work_signalled=True) == 1
    credits.claimed(1, 0)
    credits.freed(1)
    assert (credits.available, credits.excess) == (2, 0)


def test_nothing_is_claimed_after_stop() -> None:
    credits = IntakeCredits(4)
    credits.stop()
    assert credits.next_claim(work_signalled=True) == 0
    credits.freed(4)
    assert credits.next_claim(work_signalled=True) == 0


class IntakeMachine(RuleBasedStateMachine):
    """The dispatcher's view: claims come back, steps finish one by one (or a few at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.credits = IntakeCredits(1)
        self.capacity = self.slots = 1
        self.unfinished = 0  # claimed and not yet finished
        self.in_flight: int | None = None  # the limit of the claim on its way
        # Steps that finished (their credits are back) whose commit has not run yet: it may
        # claim up to one dependent for each of them.
        self.awaiting_commit = 0
        # How many were awaiting their commit when the intake last claimed: the most the
        # worker can hold beyond its capacity until the intake claims again.
        self.overshoot_allowed = 0

    @initialize(slots=st.integers(min_value=1, max_value=12), prefetch=st.integers(0, 12))
    def start(self, slots: int, prefetch: int) -> None:
        # As the worker sets it up: capacity is the slots plus the largest window.
        self.slots = slots
        self.capacity = slots + prefetch
        self.credits = IntakeCredits(slots, prefetch)

    @rule(data=st.data())
    def window_resized(self, data: st.DataObject) -> None:
        # The Dispatcher's window follows the handlers' pace, anywhere up to the ceiling.
        self.credits.resize(data.draw(st.integers(0, self.credits.max_prefetch)))

    @rule(work_signalled=st.booleans())
    def ask_for_a_claim(self, work_signalled: bool) -> None:
        limit = self.credits.next_claim(work_signalled=work_signalled)
        assert limit >= 0
        if self.in_flight is not None or self.credits.stopped:
            assert limit == 0
        if limit:
            # Never more claimed than the slots and the window of the moment.
            assert self.unfinished + limit <= self.slots + self.credits.prefetch
            assert limit >= claim_batch(self.credits.prefetch)
            self.in_flight = limit
            self.overshoot_allowed = self.awaiting_commit
        elif self.in_flight is None and self.credits.backlog_likely and not self.credits.stopped:
            # Declined for want of credits: only while every slot has a claimed step to run,
            # so waiting for a bigger claim never leaves a handler idle.
            assert self.unfinished >= self.slots

    @precondition(lambda self: self.in_flight is not None)
    @rule(data=st.data())
    def claim_returns(self, data: st.DataObject) -> None:
        assert self.in_flight is not None
        got = data.draw(st.integers(min_value=0, max_value=self.in_flight))
        self.credits.claimed(self.in_flight, got)
        self.unfinished += got
        self.in_flight = None

    @precondition(lambda self: self.unfinished > 0)
    @rule(data=st.data())
    def steps_finish(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(min_value=1, max_value=self.unfinished))
        self.credits.freed(n)
        self.unfinished -= n
        self.awaiting_commit += n

    @precondition(lambda self: self.awaiting_commit > 0)
    @rule(data=st.data())
    def commit_claims_dependents(self, data: st.DataObject) -> None:
        # A commit of finished steps claims at most one dependent per step it committed.
        committed = data.draw(st.integers(min_value=1, max_value=self.awaiting_commit))
        claimed = data.draw(st.integers(min_value=0, max_value=committed))
        self.awaiting_commit -= committed
        self.unfinished += claimed
        self.credits.claimed_eagerly(claimed)

    @rule()
    def stop(self) -> None:
        self.credits.stop()

    @invariant()
    def never_more_claimed_than_capacity(self) -> None:
        # Beyond the capacity only by what commits claimed that the intake did not know of
        # when it last claimed.
        reserved = self.in_flight or 0
        assert self.unfinished + reserved <= self.capacity + self.overshoot_allowed
        assert self.credits.available <= self.capacity
        assert self.credits.available + self.unfinished + reserved <= self.capacity
        assert self.credits.excess == 0

    @invariant()
    def no_capacity_is_lost(self) -> None:
        # Every credit is free, reserved by the claim on its way, or held by an unfinished step.
        reserved = self.in_flight or 0
        assert self.credits.available + self.unfinished + reserved == self.capacity

    @invariant()
    def claim_in_flight_flag_matches(self) -> None:
        assert self.credits.claim_in_flight == (self.in_flight is not None)


IntakeMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_intake_credits_machine = IntakeMachine.TestCase
