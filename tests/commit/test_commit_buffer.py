"""CommitBuffer: batching, linger, backoff and the lag signal, without threads."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from duplex.clock import utcnow
from duplex.commit.buffer import RETRY_MAX_S, CommitBuffer
from duplex.messages import ClaimedStep, StepOutcome


def outcome(i: int) -> StepOutcome:
    step = ClaimedStep(
        step_uuid=f"s{i}",
        task_uuid="t",
        name=f"s{i}",
        handler="h",
        attempt=1,
        max_attempts=1,
        retryable=True,
        timeout_ms=None,
        claimed_by="w",
    )
    now = utcnow()
    return StepOutcome(step, now, now, result={})


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        CommitBuffer(0)


def test_a_batch_takes_at_most_batch_size_results_and_every_release() -> None:
    buffer = CommitBuffer(3)
    for i in range(5):
        buffer.add(outcome(i))
    buffer.add_releases([outcome(9).step])
    batch, releases = buffer.next_batch()
    assert [o.step.step_uuid for o in batch] == ["s0", "s1", "s2"]
    assert [r.step_uuid for r in releases] == ["s9"]
    buffer.committed(len(batch), releases=True)
    assert [o.step.step_uuid for o in buffer.outcomes] == ["s3", "s4"]
    assert buffer.releases == []
    assert buffer.held == 2


def test_a_lone_result_commits_at_once_even_with_a_linger() -> None:
    buffer = CommitBuffer(10, linger_s=0.005)
    assert buffer.schedule() is None  # nothing to commit
    buffer.add(outcome(0))
    assert buffer.schedule() == 0.0
    assert buffer.schedule() is None  # already scheduled
    assert buffer.due(buffer.round)
    buffer.committed(1, releases=False)
    buffer.add(outcome(1))
    assert buffer.schedule() == 0.0  # the last batch held one: still no linger


def test_after_a_batch_of_several_the_next_lingers_until_it_gathers_as_many() -> None:
    buffer = CommitBuffer(10, linger_s=0.005)
    for i in range(3):
        buffer.add(outcome(i))
    buffer.committed(3, releases=False)
    buffer.add(outcome(3))
    assert buffer.schedule() == 0.005
    assert buffer.lingering
    assert not buffer.gathered()
    buffer.add(outcome(4))
    assert not buffer.gathered()
    buffer.add(outcome(5))
    assert buffer.gathered()  # three, as many as the last batch: commit now
    assert not buffer.gathered()  # said once
    lingered = buffer.round
    assert buffer.due(lingered)
    assert not buffer.due(lingered)  # the linger's timer, firing later, finds it taken


def test_the_gather_target_never_exceeds_batch_size() -> None:
    buffer = CommitBuffer(2, linger_s=0.005)
    buffer.committed(7, releases=False)
    assert buffer.gather_target == 2
    buffer.add(outcome(0))
    buffer.add(outcome(1))
    assert buffer.schedule() == 0.0
    assert CommitBuffer(2).schedule() is None
    no_linger = CommitBuffer(2)
    no_linger.committed(2, releases=False)
    no_linger.add(outcome(0))
    assert no_linger.schedule() == 0.0


def test_a_retry_gets_a_round_of_its_own() -> None:
    buffer = CommitBuffer(2, linger_s=0.005)
    buffer.add(outcome(0))
    buffer.schedule()
    first = buffer.round
    assert buffer.due(first)
    retry = buffer.schedule_retry()
    assert retry != first
    assert not buffer.due(first)
    assert buffer.due(retry)


def test_failed_commits_back_off_exponentially_up_to_a_cap() -> None:
    buffer = CommitBuffer(2)
    delays = [buffer.failed() for _ in range(12)]
    assert delays[:4] == [0.05, 0.1, 0.2, 0.4]
    assert delays[-1] == RETRY_MAX_S
    assert buffer.failing
    buffer.committed(0, releases=False)
    assert not buffer.failing
    assert buffer.failed() == 0.05


def test_lag_starts_at_batch_size_and_ends_at_half() -> None:
    buffer = CommitBuffer(4)
    started = [buffer.add(outcome(i)) for i in range(6)]
    assert started == [False, False, False, True, False, False]
    assert buffer.committed(1, releases=False) is False  # 5 left
    assert buffer.committed(3, releases=False) is True  # 2 left: resume
    assert not buffer.lagging


class CommitBufferMachine(RuleBasedStateMachine):
    """Whatever the order of arrivals, commits and failures: results leave in arrival order,
    exactly once, no batch is larger than batch_size, and lag is signalled once per episode."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = CommitBuffer(5)
        self.arrived = 0
        self.committed: list[str] = []
        self.lag_started = 0
        self.lag_ended = 0

    @rule(count=st.integers(1, 7))
    def results_arrive(self, count: int) -> None:
        for _ in range(count):
            self.lag_started += self.buffer.add(outcome(self.arrived))
            self.arrived += 1

    @precondition(lambda self: bool(self.buffer))
    @rule(fail=st.booleans())
    def commit(self, fail: bool) -> None:
        batch, _ = self.buffer.next_batch()
        assert len(batch) <= self.buffer.batch_size
        if fail:
            assert 0 < self.buffer.failed() <= RETRY_MAX_S
            return
        self.committed.extend(o.step.step_uuid for o in batch)
        self.lag_ended += self.buffer.committed(len(batch), releases=True)

    @invariant()
    def nothing_lost_or_repeated(self) -> None:
        waiting = [o.step.step_uuid for o in self.buffer.outcomes]
        assert self.committed + waiting == [f"s{i}" for i in range(self.arrived)]

    @invariant()
    def lag_follows_the_count(self) -> None:
        assert self.lag_started - self.lag_ended == int(self.buffer.lagging)
        if len(self.buffer.outcomes) >= self.buffer.batch_size:
            assert self.buffer.lagging
        if len(self.buffer.outcomes) <= self.buffer.batch_size // 2:
            assert not self.buffer.lagging


CommitBufferMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40)
test_commit_buffer_machine = CommitBufferMachine.TestCase


class GroupCommitMachine(RuleBasedStateMachine):
    """The CompletionProcessor's scheduling, messages and timers played out in any order: a
    commit is always on its way while results wait, each scheduled round commits at most
    once, and a batch lingers only after a batch of several results."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = CommitBuffer(5, linger_s=0.005)
        self.arrived = 0
        self.on_the_way: list[int] = []  # rounds told to the actor or set on a timer
        self.committed_rounds: list[int] = []

    def _schedule_flush(self) -> None:
        # As ``CompletionProcessor._schedule_flush`` does.
        delay = self.buffer.schedule()
        if delay is None:
            if self.buffer.gathered():
                self.on_the_way.append(self.buffer.round)
            return
        if delay:
            assert self.buffer.last_batch >= 2  # a lone result is never made to wait
        self.on_the_way.append(self.buffer.round)

    @rule(count=st.integers(1, 4))
    def results_arrive(self, count: int) -> None:
        for _ in range(count):
            self.buffer.add(outcome(self.arrived))
            self.arrived += 1
            self._schedule_flush()

    @precondition(lambda self: bool(self.on_the_way))
    @rule(data=st.data(), fail=st.booleans())
    def a_flush_arrives(self, data: st.DataObject, fail: bool) -> None:
        i = data.draw(st.integers(0, len(self.on_the_way) - 1))
        round = self.on_the_way.pop(i)
        if not self.buffer.due(round):
            return
        assert round not in self.committed_rounds
        self.committed_rounds.append(round)
        batch, _ = self.buffer.next_batch()
        if fail:
            self.buffer.failed()
            self.on_the_way.append(self.buffer.schedule_retry())
            return
        self.buffer.committed(len(batch), releases=True)
        self._schedule_flush()

    @invariant()
    def a_commit_is_on_its_way_while_results_wait(self) -> None:
        if self.buffer:
            assert self.buffer.flush_scheduled
            assert self.buffer.round in self.on_the_way

    @invariant()
    def a_batch_lingers_only_short_of_its_target(self) -> None:
        if self.buffer.lingering:
            assert len(self.buffer.outcomes) < self.buffer.gather_target


GroupCommitMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50)
test_group_commit_machine = GroupCommitMachine.TestCase
