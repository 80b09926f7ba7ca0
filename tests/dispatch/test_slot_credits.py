"""The Dispatcher's credit bookkeeping (``SlotCredits``): pace and batched hand-backs."""

from __future__ import annotations

from duplex.dispatch.credits import SlotCredits
from duplex.intake.prefetch import PrefetchWindow, claim_batch


def test_with_nothing_waiting_every_credit_goes_back_at_once() -> None:
    credits = SlotCredits.for_pool(4, 8)
    assert [credits.freed(batched=True, waiting=False) for _ in range(3)] == [1, 1, 1]


def test_while_steps_wait_credits_go_back_in_batches_of_half_the_window() -> None:
    credits = SlotCredits(PrefetchWindow(slots=8, ceiling=8))
    batch = claim_batch(credits.window.size)
    assert batch == 4
    handed = [credits.freed(batched=True, waiting=True) for _ in range(2 * batch)]
    assert handed == [0, 0, 0, batch, 0, 0, 0, batch]


def test_a_lost_slot_hands_back_what_was_held_at_once() -> None:
    credits = SlotCredits(PrefetchWindow(slots=8, ceiling=8))
    assert credits.freed(batched=True, waiting=True) == 0
    assert credits.freed(batched=False, waiting=True) == 2  # a timeout: no batching
    assert credits.unreported == 0


def test_an_ended_attempt_reports_how_long_it_held_its_slot_and_sets_the_pace() -> None:
    credits = SlotCredits.for_pool(10, 100)
    credits.assigned(1, now=100.0)
    assert credits.ended(1, now=100.5) == 0.5
    assert credits.window.mean_s == 0.5
    assert credits.window.size == 2  # 10 slots / 0.5 s * 0.1 s horizon


def test_an_attempt_never_assigned_held_nothing_and_leaves_the_pace_alone() -> None:
    credits = SlotCredits.for_pool(2, 4)
    assert credits.ended(7, now=5.0) == 0.0
    assert credits.window.mean_s is None
    credits.assigned(7, now=1.0)
    credits.ended(7, now=2.0)
    assert credits.ended(7, now=3.0) == 0.0  # once only
