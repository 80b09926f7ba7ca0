"""Timer: one thread fires callbacks in time order; cancel and failures are contained."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator

import pytest

from duplex.clock import COMPACT_AT, Timer

WAIT_S = 10.0


def mark(fired: list[str], label: str, done: threading.Event | None = None) -> Callable[[], None]:
    """Return a callback that records ``label`` and then sets ``done``."""

    def callback() -> None:
        fired.append(label)
        if done is not None:
            done.set()

    return callback


@pytest.fixture
def timer() -> Iterator[Timer]:
    t = Timer(name="test-timer")
    try:
        yield t
    finally:
        t.stop()


def test_callbacks_fire_in_time_order_not_scheduling_order(timer: Timer) -> None:
    fired: list[str] = []
    done = threading.Event()
    # Gaps of 0.2 s dwarf the time between these calls, so the due times are ordered.
    timer.call_later(0.6, mark(fired, "c", done))
    timer.call_later(0.2, lambda: fired.append("a"))
    timer.call_later(0.4, lambda: fired.append("b"))
    timer.call_later(0.0, lambda: fired.append("now"))
    assert done.wait(WAIT_S)
    assert fired == ["now", "a", "b", "c"]


def test_negative_delay_fires_at_once(timer: Timer) -> None:
    done = threading.Event()
    timer.call_later(-5, done.set)
    assert done.wait(WAIT_S)


def test_callbacks_run_on_the_timer_thread(timer: Timer) -> None:
    names: list[str] = []
    done = threading.Event()
    timer.call_later(0, lambda: mark(names, threading.current_thread().name, done)())
    assert done.wait(WAIT_S)
    assert names == ["test-timer"]


def test_cancelled_callback_never_fires(timer: Timer) -> None:
    fired: list[str] = []
    done = threading.Event()
    handle = timer.call_later(0.1, lambda: fired.append("cancelled"))
    timer.call_later(0.3, mark(fired, "kept", done))
    handle.cancel()
    assert done.wait(WAIT_S)
    assert fired == ["kept"]


def test_cancelling_the_earliest_entry_does_not_delay_the_others(timer: Timer) -> None:
    fired: list[int] = []
    done = threading.Event()
    handles = [timer.call_later(0.05 * i, functools.partial(fired.append, i)) for i in range(1, 6)]
    for handle in handles[::2]:
        handle.cancel()
    timer.call_later(0.5, done.set)
    assert done.wait(WAIT_S)
    assert fired == [2, 4]


def test_cancel_after_firing_is_harmless(timer: Timer) -> None:
    done = threading.Event()
    handle = timer.call_later(0, done.set)
    assert done.wait(WAIT_S)
    handle.cancel()
    assert handle.cancelled


def test_a_failing_callback_does_not_stop_later_ones(timer: Timer) -> None:
    fired: list[str] = []
    done = threading.Event()

    def explode() -> None:
        fired.append("explode")
        raise RuntimeError("callback failed")

    timer.call_later(0.1, explode)
    timer.call_later(0.2, lambda: fired.append("after"))
    timer.call_later(0.3, mark(fired, "last", done))
    assert done.wait(WAIT_S)
    assert fired == ["explode", "after", "last"]
    # The thread is still serving new timers.
    again = threading.Event()
    timer.call_later(0, again.set)
    assert again.wait(WAIT_S)


def test_a_callback_may_schedule_another(timer: Timer) -> None:
    fired: list[str] = []
    done = threading.Event()

    def first() -> None:
        fired.append("first")
        timer.call_later(0, mark(fired, "second", done))

    timer.call_later(0, first)
    assert done.wait(WAIT_S)
    assert fired == ["first", "second"]


def test_timers_scheduled_from_many_threads_all_fire(timer: Timer) -> None:
    count = 200
    fired: list[int] = []
    lock = threading.Lock()
    all_fired = threading.Event()

    def record(i: int) -> None:
        with lock:
            fired.append(i)
            if len(fired) == count:
                all_fired.set()

    def schedule(start: int) -> None:
        for i in range(start, start + count // 4):
            timer.call_later(0.001 * (i % 7), functools.partial(record, i))

    threads = [threading.Thread(target=schedule, args=(k * count // 4,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert all_fired.wait(WAIT_S)
    assert sorted(fired) == list(range(count))


def test_stop_drops_pending_callbacks() -> None:
    timer = Timer()
    fired: list[str] = []
    timer.call_later(30, lambda: fired.append("late"))
    timer.stop()
    assert fired == []
    # Stopping twice is harmless.
    timer.stop()


def test_a_delay_beyond_what_the_clock_can_wait_does_not_kill_the_thread(timer: Timer) -> None:
    # Condition.wait overflows past threading.TIMEOUT_MAX; the timer must survive that.
    done = threading.Event()
    timer.call_later(1e12, lambda: None)
    timer.call_later(0.01, done.set)
    assert done.wait(5)


def test_cancelled_entries_do_not_pile_up(timer: Timer) -> None:
    # Like handler deadlines: each is cancelled long before its time, thousands a second.
    live = [timer.call_later(3600, lambda: None) for _ in range(100)]
    for _ in range(20 * COMPACT_AT):
        timer.call_later(3600, lambda: None).cancel()
    assert 100 <= timer.pending <= 100 + 2 * COMPACT_AT + 1
    assert not any(handle.cancelled for handle in live)
    fired = threading.Event()
    timer.call_later(0.01, fired.set)
    assert fired.wait(2), "a live timer was dropped with the cancelled ones"
