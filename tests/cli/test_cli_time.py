"""``duplex submit --at / --in / --priority``: what is stored, what ``status`` shows, and every
bad value refused with one line and the usage exit code, nothing written."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from duplex.cli.common import EXIT_USAGE
from tests.cli.support import TEMPLATES, Duplex, assert_one_line_error, make_duplex

DIAMOND = str(TEMPLATES / "diamond.toml")


@pytest.fixture(scope="module")
def duplex(tmp_path_factory: pytest.TempPathFactory) -> Duplex:
    d = make_duplex(tmp_path_factory.mktemp("time"))
    d.ok("migrate")
    return d


def roots(duplex: Duplex, task: str) -> list[tuple[str, int]]:
    return duplex.sql(
        "SELECT next_attempt_at, priority FROM workflow_steps"
        " WHERE task_uuid = ? AND state = 'enqueued'",
        [task],
    )


def stored(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_at_stores_the_start_and_status_shows_it(duplex: Duplex) -> None:
    result = duplex.ok("submit", DIAMOND, "--at", "2030-12-24T08:00:00+01:00", "--priority", "7")
    task = result.stdout.split()[-1]
    assert "scheduled for 2030-12-24T07:00:00+00:00" in result.stderr
    ((at, priority),) = roots(duplex, task)
    assert (stored(at), priority) == (datetime(2030, 12, 24, 7, tzinfo=UTC), 7)
    line = next(x for x in duplex.ok("status").stdout.splitlines() if x.startswith(task))
    assert "scheduled for 2030-12-24 07:00:00 UTC" in line
    assert "scheduled for 2030-12-24 07:00:00 UTC" in duplex.ok("status", task).stdout


def test_in_counts_from_now(duplex: Duplex) -> None:
    before = datetime.now(UTC)
    task = duplex.ok("submit", DIAMOND, "--in", "15m").stdout.split()[-1]
    after = datetime.now(UTC)
    ((at, priority),) = roots(duplex, task)
    assert before + timedelta(minutes=15) <= stored(at) <= after + timedelta(minutes=15)
    assert priority == 0


def test_a_past_at_means_now(duplex: Duplex) -> None:
    result = duplex.ok("submit", DIAMOND, "--at", "2001-01-01T00:00:00Z")
    assert "scheduled" not in result.stderr
    ((at, _),) = roots(duplex, result.stdout.split()[-1])
    assert stored(at) > datetime(2020, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--at", "2099-12-24T08:00:00"], ["--at", "has no time zone"]),
        (["--in", "15"], ["--in", "not a duration", "15m"]),
        (["--in=-5s"], ["--in", "not a duration"]),
        (["--in", "4000d"], ["--in", "over the limit"]),
        (["--in", "1m", "--at", "2099-01-01T00:00:00Z"], ["not allowed with"]),
        (["--priority", "101"], ["--priority", "out of range", "-100", "100"]),
        (["--priority", "high"], ["--priority", "not an integer"]),
    ],
)
def test_bad_values_are_refused_with_one_line(
    duplex: Duplex, args: list[str], fragments: list[str]
) -> None:
    (count_before,) = duplex.sql("SELECT count(*) FROM tasks")
    result = duplex.run("submit", DIAMOND, *args)
    assert result.returncode == EXIT_USAGE
    assert_one_line_error(result, *fragments)
    assert duplex.sql("SELECT count(*) FROM tasks") == [count_before]


def test_status_json_carries_the_start_and_the_priorities(duplex: Duplex) -> None:
    task = duplex.ok("submit", DIAMOND, "--in", "1h", "--priority", "-4").stdout.split()[-1]

    shown = json.loads(duplex.ok("status", task, "--json").stdout)
    assert shown["execution_status"] == "scheduled"
    assert shown["scheduled_for"] is not None
    assert {step["priority"] for step in shown["steps"]} == {-4}
