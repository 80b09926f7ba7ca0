"""``duplex limits`` and flow control through the command line, with a real ``duplex run``
on SQLite: a template naming an undeclared limit is refused with one line, ``limits set``
creates and changes a limit, ``limits list`` and ``status`` show limits and keys, and the
keyed, rate-limited tasks all run with ``run --until-idle``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.support import TEMPLATES, Duplex, assert_one_line_error, make_duplex

FLOW = TEMPLATES / "flow_control.toml"


@pytest.fixture
def duplex(tmp_path: Path) -> Duplex:
    return make_duplex(tmp_path)


def test_limits_keys_and_status_through_the_command_line(duplex: Duplex) -> None:
    duplex.ok("migrate")
    refused = duplex.run("submit", str(FLOW), "--context", '{"customer": "c1"}')
    assert_one_line_error(refused, "rate limit 'crm' is not declared", "duplex limits set crm")
    assert duplex.sql("SELECT COUNT(*) FROM tasks") == [(0,)]

    created = duplex.ok("limits", "set", "crm", "50/s", "--burst", "2")
    assert created.stdout.strip() == "rate limit crm: 50/s, burst 2 (new)"
    changed = duplex.ok("limits", "set", "crm", "20/100ms")
    assert changed.stdout.strip() == "rate limit crm: 20/100ms, burst 0 (was 50/s, burst 2)"
    (listed,) = json.loads(duplex.ok("limits", "list", "--json").stdout)
    assert (listed["name"], listed["rate"], listed["burst"]) == ("crm", "20/100ms", 0)
    assert "crm" in duplex.ok("limits", "list").stdout

    tasks = [duplex.submit(FLOW, {"customer": f"c{i % 2}"}) for i in range(6)]
    missing = duplex.run("submit", str(FLOW), "--context", '{"client": 1}')
    assert_one_line_error(missing, "the task's context has no context.customer")
    status = duplex.ok("status").stdout
    assert "rate limit crm: 20/100ms, burst 0, 1.0 token(s) now" in status

    duplex.ok("run", "--until-idle")
    for task in tasks:
        assert duplex.step_states(task) == {"sync": ("complete", 1)}
    listing = json.loads(duplex.ok("status", "--json").stdout)
    assert listing["rate_limits"][0]["name"] == "crm"
    # Nothing runs or is held any more: no key is listed.
    assert listing["concurrency_keys"] == []
    # Each customer's syncs ran one at a time: none started before the one before ended.
    rows = duplex.sql(
        "SELECT s.concurrency_key, t.to_state, t.id FROM workflow_step_transitions t"
        " JOIN workflow_steps s ON s.step_uuid = t.step_uuid"
        " WHERE t.to_state IN ('in_progress', 'complete') ORDER BY t.id"
    )
    running: dict[str, int] = {}
    for key, to_state, _ in rows:
        running[key] = running.get(key, 0) + (1 if to_state == "in_progress" else -1)
        assert running[key] <= 1, rows


def test_bad_limits_are_one_line_errors(duplex: Duplex) -> None:
    duplex.ok("migrate")
    assert_one_line_error(duplex.run("limits", "set", "crm", "fast"), "invalid rate 'fast'")
    assert_one_line_error(duplex.run("limits", "set", "crm", "0/s"), "at least 1 per period")
    assert_one_line_error(duplex.run("limits", "set", "a b", "1/s"), "invalid limit name")
    assert_one_line_error(
        duplex.run("limits", "set", "crm", "1/s", "--burst", "-1"), "invalid burst -1"
    )
    assert duplex.sql("SELECT COUNT(*) FROM rate_limits") == [(0,)]
    assert duplex.ok("limits", "list").stdout.strip() == "no rate limits"
