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


def test_a_partial_batch_lingers_a_full_one_commits_at_once() -> None:
    buffer = CommitBuffer(2, linger_s=0.005)
    assert buffer.schedule() is None  # nothing to commit
    buffer.add(outcome(0))
    assert buffer.schedule() == 0.005
    assert buffer.schedule() is None  # already scheduled
    buffer.flush_scheduled = False
    buffer.add(outcome(1))
    assert buffer.schedule() == 0.0
    assert CommitBuffer(2).schedule() is None
    no_linger = CommitBuffer(2)
    no_linger.add(outcome(0))
    assert no_linger.schedule() == 0.0


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
