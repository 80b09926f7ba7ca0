"""``duplex pause`` / ``duplex resume`` through the command line, with real ``duplex run``
processes on SQLite: a paused namespace's step is never claimed while the rest runs, ``run
--until-idle`` does not wait for it, ``status`` shows the pause, and after ``resume`` it runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.support import TEMPLATES, Duplex, assert_one_line_error, make_duplex


@pytest.fixture
def duplex(tmp_path: Path) -> Duplex:
    return make_duplex(tmp_path)


def test_a_paused_namespace_waits_until_it_is_resumed(duplex: Duplex) -> None:
    duplex.ok("migrate")
    paused = duplex.ok("pause", "other", "--reason", "supplier outage")
    assert paused.stdout.startswith("paused namespace 'other'")
    again = duplex.ok("pause", "other")
    assert "was already paused" in again.stdout
    # Submitted first: the oldest ready step, and still never claimed.
    theirs = duplex.submit(TEMPLATES / "other_namespace.toml")
    mine = duplex.submit(TEMPLATES / "diamond.toml")

    # Exits once everything not paused is done: paused work is not work it can do.
    duplex.ok("run", "--until-idle", "--namespace", "default", "--namespace", "other")
    assert duplex.step_states(mine) == {name: ("complete", 1) for name in "abcd"}
    assert duplex.step_states(theirs) == {"only": ("enqueued", 0)}

    status = duplex.ok("status")
    assert "paused: namespace 'other' since" in status.stdout
    assert "(supplier outage)" in status.stdout
    (pause,) = json.loads(duplex.ok("status", "--json").stdout)["paused"]
    assert (pause["kind"], pause["name"], pause["reason"]) == (
        "namespace",
        "other",
        "supplier outage",
    )

    assert duplex.ok("resume", "other").stdout.strip() == "resumed namespace 'other'"
    assert "was not paused" in duplex.ok("resume", "other").stdout
    duplex.ok("run", "--until-idle", "--namespace", "default", "--namespace", "other")
    assert duplex.step_states(theirs) == {"only": ("complete", 1)}
    assert json.loads(duplex.ok("status", "--json").stdout)["paused"] == []


def test_a_paused_template_holds_back_only_its_tasks(duplex: Duplex) -> None:
    duplex.ok("migrate")
    held = duplex.submit(TEMPLATES / "diamond.toml")
    duplex.ok("pause", "--template", "e2e_diamond")
    other = duplex.submit(TEMPLATES / "other_namespace.toml")

    duplex.ok("run", "--until-idle", "--namespace", "default", "--namespace", "other")
    assert duplex.step_states(other) == {"only": ("complete", 1)}
    assert set(duplex.step_states(held).values()) <= {("enqueued", 0), ("pending", 0)}

    duplex.ok("resume", "--template", "e2e_diamond")
    duplex.ok("run", "--until-idle", "--namespace", "default", "--namespace", "other")
    assert duplex.step_states(held) == {name: ("complete", 1) for name in "abcd"}


def test_bad_pause_targets_are_one_line_errors(duplex: Duplex) -> None:
    duplex.ok("migrate")
    assert_one_line_error(duplex.run("pause"), "NAMESPACE or --template")
    assert_one_line_error(duplex.run("pause", "ns", "--template", "t"), "not both")
    assert_one_line_error(duplex.run("resume", "x" * 300), "longer than 255")
    assert duplex.sql("SELECT COUNT(*) FROM pauses") == [(0,)]
