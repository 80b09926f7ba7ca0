"""The dashboard's plain logic: DAG layout, attempts and timeline, login and CSRF guards,
query-string parsing. No server, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duplex.attempts import RUNNING, attempts
from duplex.dashboard.graph import GraphStep, depths, layout
from duplex.dashboard.pages import cursor_text, filter_params, parse_task_list_query
from duplex.dashboard.security import (
    Guard,
    check_binding,
    is_loopback,
    operator_name,
    same_origin,
)
from duplex.dashboard.timeline import timeline
from duplex.errors import ConfigurationError, InputError
from duplex.storage.queries import TransitionRow

T0 = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC)

# --- graph -------------------------------------------------------------------------------------


def _step(key: str, *parents: str, state: str = "pending") -> GraphStep:
    return GraphStep(key, key, state, tuple(parents))


def test_depth_is_one_more_than_the_deepest_parent() -> None:
    steps = [_step("a"), _step("b", "a"), _step("c", "a", "b"), _step("d"), _step("e", "c", "d")]
    assert depths(steps) == {"a": 0, "b": 1, "c": 2, "d": 0, "e": 3}


def test_children_listed_before_their_parents_still_get_their_depth() -> None:
    steps = [_step("late", "early"), _step("early")]
    assert depths(steps) == {"late": 1, "early": 0}


@st.composite
def dags(draw: Any) -> list[GraphStep]:
    count = draw(st.integers(1, 60))
    steps = []
    for index in range(count):
        parents = draw(st.sets(st.integers(0, index - 1), max_size=3)) if index else set()
        steps.append(_step(f"s{index}", *(f"s{p}" for p in sorted(parents))))
    shuffled: list[GraphStep] = draw(st.permutations(steps))
    return shuffled


@settings(max_examples=200, deadline=None)
@given(dags(), st.integers(1, 8))
def test_every_node_is_placed_once_right_of_its_parents_without_overlap(
    steps: list[GraphStep], max_rows: int
) -> None:
    drawn = layout(steps, max_rows=max_rows, compact_above=30)
    nodes = {node.key: node for node in drawn.nodes}
    assert sorted(nodes) == sorted(step.key for step in steps)
    for step in steps:
        for parent in step.parents:
            assert nodes[parent].x + nodes[parent].width <= nodes[step.key].x
    boxes = {(node.x, node.y) for node in drawn.nodes}
    assert len(boxes) == len(drawn.nodes)
    for node in drawn.nodes:
        assert node.x + node.width <= drawn.width
        assert node.y + node.height <= drawn.height
    assert len(drawn.edges) == sum(len(step.parents) for step in steps)
    assert drawn.compact == (len(steps) > 30)


def test_a_wide_fan_out_wraps_into_sub_columns() -> None:
    steps = (
        [_step("root")]
        + [_step(f"leaf{i}", "root") for i in range(1000)]
        + [_step("join", *(f"leaf{i}" for i in range(1000)))]
    )
    drawn = layout(steps)
    assert drawn.compact
    assert drawn.height < 1000  # 40 rows per sub-column, not 1000 rows
    assert drawn.edges == []
    assert drawn.edges_hidden == 2000


# --- attempts and timeline ---------------------------------------------------------------------


def _tr(step: str, to_state: str, at_s: float, attempt: int = 1, **kw: Any) -> TransitionRow:
    return TransitionRow(
        step_uuid=step,
        from_state=kw.get("from_state"),
        to_state=to_state,
        attempt=attempt,
        worker_id=kw.get("worker", "w1"),
        reason=kw.get("reason"),
        created_at=T0 + timedelta(seconds=at_s),
    )


def test_attempts_come_from_claims_and_the_transition_after_each() -> None:
    rows = [
        _tr("a", "enqueued", 0, 0),
        _tr("a", "in_progress", 1, 1, worker="w1"),
        _tr("b", "in_progress", 1.5, 1, worker="w2"),
        _tr("a", "waiting_for_retry", 2, 1, reason="handler_error: boom"),
        _tr("a", "in_progress", 4, 2, worker="w2"),
        _tr("a", "complete", 5, 2, reason="succeeded"),
    ]
    found = attempts(rows)
    first, second = found["a"]
    assert (first.number, first.worker_id, first.outcome, first.reason) == (
        1,
        "w1",
        "waiting_for_retry",
        "handler_error: boom",
    )
    assert first.duration_s(T0) == 1.0
    assert (second.number, second.worker_id, second.outcome) == (2, "w2", "complete")
    (running,) = found["b"]
    assert running.outcome == RUNNING
    assert running.ended_at is None
    assert running.duration_s(T0 + timedelta(seconds=3.5)) == 2.0


def test_timeline_places_attempts_on_one_axis() -> None:
    rows = [
        _tr("a", "in_progress", 0),
        _tr("a", "complete", 10),
        _tr("b", "in_progress", 5),
        _tr("b", "error", 6),
    ]
    drawn = timeline(
        [("a", "A"), ("b", "B"), ("c", "C")], attempts(rows), now=T0 + timedelta(seconds=20)
    )
    assert [lane.label for lane in drawn.lanes] == ["A", "B"]  # c never ran
    (bar_a,) = drawn.lanes[0].bars
    (bar_b,) = drawn.lanes[1].bars
    assert (bar_a.left, bar_a.width) == (0.0, 100.0)
    assert (bar_b.left, bar_b.width) == (50.0, 10.0)
    assert drawn.span_s == 10.0


def test_a_running_attempt_reaches_now_and_lanes_are_capped() -> None:
    rows = [_tr(f"s{i}", "in_progress", i) for i in range(5)]
    drawn = timeline(
        [(f"s{i}", f"s{i}") for i in range(5)],
        attempts(rows),
        now=T0 + timedelta(seconds=10),
        max_lanes=3,
    )
    assert len(drawn.lanes) == 3
    assert drawn.lanes_hidden == 2
    assert drawn.end == T0 + timedelta(seconds=10)
    assert drawn.lanes[0].bars[0].width == 100.0


# --- security ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_binding_beyond_loopback_needs_a_token() -> None:
    check_binding("127.0.0.1", None)
    check_binding("0.0.0.0", "a-token-of-sixteen+")
    with pytest.raises(ConfigurationError, match=r"dashboard\.token") as caught:
        check_binding("0.0.0.0", None)
    assert "\n" not in str(caught.value)


def test_a_session_names_its_operator_until_it_expires() -> None:
    guard = Guard.create("0123456789abcdef", session_hours=1)
    cookie = guard.new_session("ada", now=1000.0)
    assert guard.session_name(cookie, now=1000.0 + 3599) == "ada"
    assert guard.session_name(cookie, now=1000.0 + 3601) is None
    body, signature = cookie.rsplit(".", 1)
    forged = Guard.create("0123456789abcdeX", session_hours=1).new_session("ada", now=1000.0)
    assert guard.session_name(forged, now=1000.0) is None
    assert guard.session_name(body + "." + signature[:-1] + "A", now=1000.0) is None
    assert guard.session_name("garbage", now=1000.0) is None
    # Sessions survive a restart (the key comes from the token); CSRF tokens do not.
    again = Guard.create("0123456789abcdef", session_hours=1)
    assert again.session_name(cookie, now=1000.0) == "ada"
    assert again.csrf_token("c") != guard.csrf_token("c")


def test_csrf_token_pairs_with_its_cookie_only() -> None:
    guard = Guard.create(None, session_hours=1)
    cookie = guard.new_csrf_cookie()
    token = guard.csrf_token(cookie)
    assert guard.csrf_ok(cookie, token)
    assert not guard.csrf_ok(cookie, None)
    assert not guard.csrf_ok(None, token)
    assert not guard.csrf_ok(guard.new_csrf_cookie(), token)
    assert not guard.csrf_ok(cookie, token[:-1])


def test_bearer_and_token_checks() -> None:
    guard = Guard.create("0123456789abcdef", session_hours=1)
    assert guard.bearer_ok("Bearer 0123456789abcdef")
    assert not guard.bearer_ok("Bearer 0123456789abcdeg")
    assert not guard.bearer_ok("Basic 0123456789abcdef")
    assert not guard.bearer_ok(None)
    assert not Guard.create(None, session_hours=1).token_matches("")


@pytest.mark.parametrize(
    ("origin", "referer", "ok"),
    [
        ("http://127.0.0.1:8420", None, True),
        (None, "http://127.0.0.1:8420/tasks/x", True),
        (None, None, True),  # no header at all: the CSRF token alone decides
        ("http://evil.example", None, False),
        ("null", None, False),
        (None, "http://evil.example/page", False),
        ("http://127.0.0.1:9999", None, False),
    ],
)
def test_same_origin(origin: str | None, referer: str | None, ok: bool) -> None:
    assert same_origin(origin, referer, "127.0.0.1:8420") is ok


def test_operator_names() -> None:
    assert operator_name("  Ada   Lovelace ") == "Ada Lovelace"
    assert operator_name("a\nb") == "a b"
    for bad in ("", "   ", None, "x" * 65, "<script>", "a;b"):
        with pytest.raises(ValueError, match="operator"):
            operator_name(bad)


# --- query strings -----------------------------------------------------------------------------


def test_task_list_query_round_trips() -> None:
    query = parse_task_list_query(
        {
            "state": "error",
            "status": "blocked_by_failures",
            "name": "orders",
            "namespace": "default",
            "since": "2026-12-01T10:30",
            "until": "2026-12-02T00:00+01:00",
        }
    )
    assert query.filter.since == datetime(2026, 12, 1, 10, 30, tzinfo=UTC)
    assert query.filter.until == datetime(2026, 12, 1, 23, 0, tzinfo=UTC)
    assert filter_params(query.filter)["until"] == "2026-12-01T23:00"
    again = parse_task_list_query(filter_params(query.filter))
    assert again.filter == query.filter


def test_cursor_round_trips() -> None:
    first = parse_task_list_query(
        {"before": "2026-12-02T10:00:00.123456+00:00~8f7c38a4-52d8-4ca3-9d3e-0e2b7d5c1f00"}
    )
    assert first.before is not None
    assert parse_task_list_query({"after": cursor_text(first.before)}).after == first.before


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"state": "done"}, "state: unknown value 'done'"),
        ({"status": "x"}, "status: unknown value"),
        ({"since": "yesterday"}, "since: not a date"),
        ({"since": "2026-12-02", "until": "2026-12-01"}, "since: must be earlier"),
        ({"before": "nonsense"}, "before: not a page position"),
        ({"after": "2026-12-02T10:00:00~not-a-uuid"}, "after: not a page position"),
        ({"before": "2026-12-02T10:00:00+00:00~x"}, "not a UUID"),
        ({"name": "n" * 256}, "name: longer than 255"),
    ],
)
def test_bad_query_strings_name_the_parameter(params: dict[str, str], fragment: str) -> None:
    with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
        parse_task_list_query(params)


def test_before_and_after_together_are_refused() -> None:
    cursor = "2026-12-02T10:00:00+00:00~8f7c38a4-52d8-4ca3-9d3e-0e2b7d5c1f00"
    with pytest.raises(InputError, match="not both"):
        parse_task_list_query({"before": cursor, "after": cursor})
