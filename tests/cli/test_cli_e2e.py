"""End to end through the ``duplex`` CLI, each command a real subprocess.

Every test works in its own ``tmp_path``, set up by ``make_duplex`` (``tests/cli/support.py``):
a ``settings.toml`` pointing at a SQLite file there and at the handlers in
``tests/e2e_handlers``, whose starts go to a run log, so a test can tell how often each step's
handler really ran. Assertions are on states, counts and orderings read back with ``sqlite3``,
never on timings.
"""

from __future__ import annotations

import json
import shutil
import signal
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.cli.support import (
    ORDER_CONTEXT,
    REPO_ROOT,
    TEMPLATES,
    Duplex,
    assert_one_line_error,
    make_duplex,
    migrated_file,
    wait_for,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database file brought to head once by `duplex migrate`, copied by tests that need one."""
    return migrated_file(make_duplex(tmp_path_factory.mktemp("migrated")))


@pytest.fixture
def duplex(tmp_path: Path, migrated_db: Path) -> Duplex:
    """A working directory whose database is already migrated."""
    env = make_duplex(tmp_path / "work")
    shutil.copyfile(migrated_db, env.db_path)
    return env


def _gated_template(path: Path, count: int, gate: Path) -> Path:
    steps = "".join(
        f'\n[[steps]]\nname = "s{i:02d}"\nhandler = "e2e.gate"\n'
        f"inputs = {{ gate = {json.dumps(str(gate))} }}\n"
        for i in range(count)
    )
    path.write_text(f'name = "e2e_gated"\n{steps}')
    return path


# --- the happy path -----------------------------------------------------------------------


def test_migrate_submit_run_status(tmp_path: Path) -> None:
    """A diamond goes through migrate, submit and `run --until-idle`, and SQL shows it all."""
    duplex = make_duplex(tmp_path)
    assert "head" in duplex.ok("migrate").stdout

    task = duplex.submit(TEMPLATES / "diamond.toml", {"k": 1})
    assert duplex.step_states(task) == {
        "a": ("enqueued", 0),
        "b": ("pending", 0),
        "c": ("pending", 0),
        "d": ("pending", 0),
    }

    run = duplex.ok("run", "--until-idle")
    assert "no work left" in run.stderr

    assert duplex.step_states(task) == {name: ("complete", 1) for name in "abcd"}
    assert duplex.sql("SELECT state FROM tasks WHERE task_uuid = ?", [task]) == [("complete",)]
    (context,) = duplex.sql("SELECT context FROM tasks WHERE task_uuid = ?", [task])[0]
    assert json.loads(context) == {"k": 1}
    # d saw both parents' results.
    (results,) = duplex.sql(
        "SELECT results FROM workflow_steps WHERE task_uuid = ? AND name = 'd'", [task]
    )[0]
    assert json.loads(results) == {"step": "d", "parents": ["b", "c"]}

    transitions = duplex.sql(
        "SELECT s.name, t.from_state, t.to_state, t.attempt FROM workflow_step_transitions t "
        "JOIN workflow_steps s ON s.step_uuid = t.step_uuid WHERE s.task_uuid = ? ORDER BY t.id",
        [task],
    )
    by_step: dict[str, list[tuple[Any, ...]]] = {}
    for name, *move in transitions:
        by_step.setdefault(name, []).append(tuple(move))
    assert by_step["a"] == [
        (None, "enqueued", 0),
        ("enqueued", "in_progress", 1),
        ("in_progress", "complete", 1),
    ]
    for name in "bcd":
        assert by_step[name] == [
            (None, "pending", 0),
            ("pending", "enqueued", 0),
            ("enqueued", "in_progress", 1),
            ("in_progress", "complete", 1),
        ], name

    events = Counter(
        name for (name,) in duplex.sql("SELECT name FROM domain_events WHERE task_uuid = ?", [task])
    )
    assert events == {"step.completed": 4, "e2e.echoed": 4}
    # Every step.completed names a step of this task and its step row.
    completed = duplex.sql(
        "SELECT e.step_uuid, s.name FROM domain_events e "
        "JOIN workflow_steps s ON s.step_uuid = e.step_uuid "
        "WHERE e.task_uuid = ? AND e.name = 'step.completed'",
        [task],
    )
    assert sorted(name for _, name in completed) == ["a", "b", "c", "d"]
    assert sorted(duplex.runs().values()) == [1, 1, 1, 1]

    listing = json.loads(duplex.ok("status", "--json").stdout)
    (summary,) = [t for t in listing["tasks"] if t["task_uuid"] == task]
    assert summary["execution_status"] == "all_complete"
    assert summary["state"] == "complete"
    assert summary["complete_steps"] == summary["total_steps"] == 4
    assert listing["workers"] == []  # the worker marked itself stopped

    detail = json.loads(duplex.ok("status", task, "--json").stdout)
    assert detail["task_uuid"] == task
    assert detail["execution_status"] == "all_complete"
    names = [step["name"] for step in detail["steps"]]
    assert sorted(names) == ["a", "b", "c", "d"]
    for position, step in enumerate(detail["steps"]):
        assert step["state"] == "complete"
        for parent in step["depends_on"]:
            assert names.index(parent) < position, f"{parent} listed after child {step['name']}"
    assert {s["name"]: sorted(s["depends_on"]) for s in detail["steps"]} == {
        "a": [],
        "b": ["a"],
        "c": ["a"],
        "d": ["b", "c"],
    }

    # The human-readable form works too.
    assert "all_complete" in duplex.ok("status", task).stdout


def test_duplex_console_script_works(tmp_path: Path) -> None:
    """The installed `duplex` script is the same CLI (every other test uses `python -m duplex`)."""
    duplex = make_duplex(tmp_path)
    assert "head" in duplex.ok("migrate", script=True).stdout
    assert json.loads(duplex.ok("status", "--json", script=True).stdout) == {
        "tasks": [],
        "total_tasks": 0,
        "workers": [],
        "events": {
            "unpublished": 0,
            "dead_lettered": 0,
            "oldest_unpublished_age_s": None,
            "published_per_s": 0.0,
        },
        "paused": [],
        "concurrency_keys": [],
        "rate_limits": [],
    }


def test_bundled_example_runs_to_completion(tmp_path: Path, migrated_db: Path) -> None:
    """examples/order_fulfillment.toml: charge is turned away once, then succeeds."""
    # cwd is not the repo: `examples` imports through PYTHONPATH alone.
    duplex = make_duplex(
        tmp_path, handler_modules=["examples.orders"], templates_dir=REPO_ROOT / "examples"
    )
    shutil.copyfile(migrated_db, duplex.db_path)
    # By name, looked up in templates.directory.
    task = duplex.submit("order_fulfillment", ORDER_CONTEXT)

    run = duplex.ok("run", "--until-idle")
    # The example's subscriber prints committed events.
    assert "event order.shipped" in run.stdout
    assert "event payment.charged" in run.stdout

    states = duplex.step_states(task)
    assert states == {
        "validate": ("complete", 1),
        "reserve_stock": ("complete", 1),
        "charge": ("complete", 2),
        "ship": ("complete", 1),
    }
    assert duplex.sql("SELECT state FROM tasks WHERE task_uuid = ?", [task]) == [("complete",)]

    charge_moves = duplex.sql(
        "SELECT t.from_state, t.to_state, t.attempt, t.reason FROM workflow_step_transitions t "
        "JOIN workflow_steps s ON s.step_uuid = t.step_uuid "
        "WHERE s.task_uuid = ? AND s.name = 'charge' ORDER BY t.id",
        [task],
    )
    assert [m[:3] for m in charge_moves] == [
        (None, "pending", 0),
        ("pending", "enqueued", 0),
        ("enqueued", "in_progress", 1),
        ("in_progress", "waiting_for_retry", 1),
        ("waiting_for_retry", "in_progress", 2),
        ("in_progress", "complete", 2),
    ]
    assert charge_moves[3][3] == "retryable_error"

    failed = duplex.sql(
        "SELECT payload FROM domain_events WHERE task_uuid = ? AND name = 'step.failed'", [task]
    )
    assert len(failed) == 1
    payload = json.loads(failed[0][0])
    assert payload["step_name"] == "charge"
    assert payload["attempt"] == 1
    assert payload["error_type"] == "retryable_error"
    assert payload["state"] == "waiting_for_retry"

    events = Counter(
        n for (n,) in duplex.sql("SELECT name FROM domain_events WHERE task_uuid = ?", [task])
    )
    assert events["step.completed"] == 4
    # The charge failed once but the step did not: its declared failure event stays silent.
    assert events["billing.charge_failed"] == 0
    assert events["payment.charged"] == 1
    assert events["order.fulfilled"] == 1

    detail = json.loads(duplex.ok("status", task, "--json").stdout)
    assert detail["execution_status"] == "all_complete"
    order = [s["name"] for s in detail["steps"]]
    assert (order[0], order[-1]) == ("validate", "ship")


# --- run options --------------------------------------------------------------------------


def test_concurrency_flag_bounds_parallel_handlers(duplex: Duplex) -> None:
    """settings say 8 slots; --concurrency 2 wins: the handlers never see more than 2 at once."""
    task = duplex.submit(TEMPLATES / "gather.toml")
    run = duplex.ok("run", "--until-idle", "--concurrency", "2")
    assert "started: 2 handler slots" in run.stderr
    assert duplex.step_states(task) == {f"g{i}": ("complete", 1) for i in range(1, 5)}
    peaks = [
        json.loads(results)["peak"]
        for (results,) in duplex.sql(
            "SELECT results FROM workflow_steps WHERE task_uuid = ?", [task]
        )
    ]
    # Each handler waits for a partner, so the pool's 2 slots are seen full, and never more.
    assert max(peaks) == 2


def test_concurrency_flag_rejects_zero(duplex: Duplex) -> None:
    result = duplex.run("run", "--until-idle", "--concurrency", "0")
    assert_one_line_error(result, "--concurrency", "at least 1")


def test_namespace_flag_limits_what_runs(duplex: Duplex) -> None:
    mine = duplex.submit(TEMPLATES / "diamond.toml")
    theirs = duplex.submit(TEMPLATES / "other_namespace.toml")

    duplex.ok("run", "--until-idle", "--namespace", "default")
    assert duplex.step_states(mine) == {name: ("complete", 1) for name in "abcd"}
    # The other namespace's step was never claimed, let alone run.
    assert duplex.step_states(theirs) == {"only": ("enqueued", 0)}
    (only_uuid,) = duplex.sql("SELECT step_uuid FROM workflow_steps WHERE task_uuid = ?", [theirs])
    assert only_uuid[0] not in duplex.runs()
    assert duplex.sql(
        "SELECT COUNT(*) FROM workflow_step_transitions WHERE step_uuid = ?", [only_uuid[0]]
    ) == [(1,)]

    # Repeatable: serving both namespaces picks it up.
    duplex.ok("run", "--until-idle", "--namespace", "other", "--namespace", "default")
    assert duplex.step_states(theirs) == {"only": ("complete", 1)}
    assert duplex.runs()[only_uuid[0]] == 1


# --- signals ------------------------------------------------------------------------------


def test_sigterm_drains_without_losing_work(duplex: Duplex) -> None:
    """SIGTERM while handlers run: intake stops, the running handlers finish and their
    results are committed, unstarted claims are handed back, and the exit is 0.

    The steps wait at a gate the test opens only once the worker has stopped its intake, so
    the signal always lands while four handlers run and most steps were never claimed,
    however fast or slow the machine is.
    """
    steps = 30
    gate = duplex.cwd / "gate"
    task = duplex.submit(_gated_template(duplex.cwd / "gated.toml", steps, gate))
    worker = duplex.start("run", "--concurrency", "4")
    try:

        def four_running() -> bool:
            assert worker.poll() is None, duplex.stderr_text()
            return len(duplex.runs()) >= 4

        wait_for(four_running, "four handlers to start")
        worker.send_signal(signal.SIGTERM)
        wait_for(lambda: "intake stopped" in duplex.stderr_text(), "the worker to stop intake")
        gate.touch()
        # Within shutdown_timeout_ms (10 s), plus slack for interpreter exit on a busy machine.
        returncode = worker.wait(timeout=10 + 10)
    finally:
        gate.touch()
    stderr = duplex.stderr_text()
    assert returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert "SIGTERM received" in stderr

    states = duplex.step_states(task)
    by_state = Counter(state for state, _ in states.values())
    assert by_state["in_progress"] == 0, states
    assert set(by_state) <= {"complete", "enqueued"}, states
    # Intake stopped with 4 handlers running and 4 claims waiting for a slot at most.
    assert by_state["complete"] >= 4, states
    assert by_state["enqueued"] >= steps - 8, states

    uuids = dict(
        duplex.sql("SELECT name, step_uuid FROM workflow_steps WHERE task_uuid = ?", [task])
    )
    started = duplex.runs()
    for name, (state, attempts) in states.items():
        if state == "complete":
            assert attempts == 1, name
            assert started[uuids[name]] == 1, name
        else:
            # Handed back or never claimed: the attempt was not counted and no handler ran.
            assert attempts == 0, name
            assert started[uuids[name]] == 0, name
    # Every handler that started was let finish and its result committed.
    assert set(started) == {uuids[n] for n, (s, _) in states.items() if s == "complete"}
    handed_back = duplex.sql(
        "SELECT t.attempt FROM workflow_step_transitions t "
        "JOIN workflow_steps s ON s.step_uuid = t.step_uuid "
        "WHERE s.task_uuid = ? AND t.from_state = 'in_progress' AND t.to_state = 'enqueued'",
        [task],
    )
    assert all(attempt == 0 for (attempt,) in handed_back)
    assert duplex.sql("SELECT COUNT(*) FROM workers WHERE stopped_at IS NULL") == [(0,)]

    duplex.ok("run", "--until-idle", "--concurrency", "4")
    assert duplex.step_states(task) == {f"s{i:02d}": ("complete", 1) for i in range(steps)}
    complete_moves = Counter(
        step_uuid
        for (step_uuid,) in duplex.sql(
            "SELECT t.step_uuid FROM workflow_step_transitions t "
            "JOIN workflow_steps s ON s.step_uuid = t.step_uuid "
            "WHERE s.task_uuid = ? AND t.to_state = 'complete'",
            [task],
        )
    )
    assert complete_moves == Counter(set(uuids.values()))
    assert duplex.runs() == Counter(set(uuids.values()))
    events = duplex.sql(
        "SELECT COUNT(*), COUNT(DISTINCT step_uuid) FROM domain_events "
        "WHERE task_uuid = ? AND name = 'step.completed'",
        [task],
    )
    assert events == [(steps, steps)]


def test_second_signal_exits_at_once(tmp_path: Path, migrated_db: Path) -> None:
    duplex = make_duplex(
        tmp_path, worker={"shutdown_timeout_ms": 300_000, "handler_timeout_ms": 600_000}
    )
    shutil.copyfile(migrated_db, duplex.db_path)
    task = duplex.submit(TEMPLATES / "long_sleep.toml")
    worker = duplex.start("run")
    try:
        wait_for(lambda: len(duplex.runs()) == 1, "the long handler to start")
        # While it runs, status sees the live worker and the task processing.
        listing = json.loads(duplex.ok("status", "--json").stdout)
        assert [w["pid"] for w in listing["workers"]] == [worker.pid]
        assert [t["execution_status"] for t in listing["tasks"]] == ["processing"]
        worker.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM received" in duplex.stderr_text(), "the drain to begin")
        # Draining waits for a handler that sleeps two minutes: still running.
        assert worker.poll() is None, duplex.stderr_text()
        worker.send_signal(signal.SIGTERM)
        returncode = worker.wait(timeout=15)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=10)
    assert returncode != 0
    assert returncode == 128 + signal.SIGTERM
    assert "Traceback" not in duplex.stderr_text()
    # What was in flight stays claimed, for the stale-claim rule to recover.
    assert duplex.step_states(task) == {"nap": ("in_progress", 1)}


# --- bad input ----------------------------------------------------------------------------


def test_missing_template_file(duplex: Duplex) -> None:
    missing = duplex.cwd / "no_such_template.toml"
    assert_one_line_error(duplex.run("submit", str(missing)), "no_such_template.toml")
    assert duplex.sql("SELECT COUNT(*) FROM tasks") == [(0,)]


@pytest.mark.parametrize(
    ("template", "fragments"),
    [
        ("cycle.toml", ("cycle.toml", "cycle", "a -> b -> a")),
        ("unknown_field.toml", ("unknown_field.toml", "retries", "unknown field")),
    ],
)
def test_invalid_template_writes_nothing(
    duplex: Duplex, template: str, fragments: tuple[str, ...]
) -> None:
    assert_one_line_error(duplex.run("submit", str(TEMPLATES / template)), *fragments)
    for table in ("tasks", "workflow_steps", "workflow_step_transitions"):
        assert duplex.sql(f"SELECT COUNT(*) FROM {table}") == [(0,)], table


@pytest.mark.parametrize(
    ("context", "fragments"),
    [
        ("{not json", ("invalid JSON context",)),
        ("[1, 2]", ("invalid JSON context", "object")),
    ],
    ids=["invalid-json", "not-an-object"],
)
def test_bad_context(duplex: Duplex, context: str, fragments: tuple[str, ...]) -> None:
    result = duplex.run("submit", str(TEMPLATES / "diamond.toml"), "--context", context)
    assert_one_line_error(result, *fragments)
    assert duplex.sql("SELECT COUNT(*) FROM tasks") == [(0,)]


@pytest.mark.parametrize(
    ("worker", "fragments"),
    [
        ({"max_concurrent_handlers": 0}, ("worker.max_concurrent_handlers",)),
        ({"max_concurency": 4}, ("worker.max_concurency", "unknown setting")),
    ],
    ids=["invalid-value", "unknown-key"],
)
def test_bad_settings_file(
    tmp_path: Path, worker: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    duplex = make_duplex(tmp_path, worker=worker)
    assert_one_line_error(duplex.run("run", "--until-idle"), *fragments)
    assert not duplex.db_path.exists()  # failed at start-up, before touching the database


def test_bad_env_override(tmp_path: Path) -> None:
    duplex = make_duplex(tmp_path)
    result = duplex.run(
        "run", "--until-idle", env={"DUPLEX_WORKER__MAX_CONCURRENT_HANDLERS": "abc"}
    )
    assert_one_line_error(result, "max_concurrent_handlers")
    assert not duplex.db_path.exists()


def test_unimportable_handler_module(duplex: Duplex) -> None:
    result = duplex.run(
        "run", "--until-idle", env={"DUPLEX_WORKER__HANDLER_MODULES": '["no_such_module"]'}
    )
    assert_one_line_error(result, "worker.handler_modules", "no_such_module")


def test_status_of_unknown_task(duplex: Duplex) -> None:
    unknown = str(uuid.uuid4())
    assert_one_line_error(duplex.run("status", unknown, "--json"), unknown)


def test_submit_before_migrate(tmp_path: Path) -> None:
    duplex = make_duplex(tmp_path)
    result = duplex.run("submit", str(TEMPLATES / "diamond.toml"))
    assert_one_line_error(result, "duplex migrate")
    assert result.stdout == ""
    status = duplex.run("status")
    assert_one_line_error(status, "duplex migrate")
