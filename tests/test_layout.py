"""The source keeps its layout: SQL in storage, storage at the bottom, actors importing forward
along the flow, no import cycles, small modules, every package installed.

The rules themselves, and why each draws its line where it does, are in
``tests/layout_rules.py``. Each rule runs on the repository and on small synthetic trees: one
that keeps every rule (the patterns the rules allow), and one per rule that breaks it once.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests import layout_rules as rules

REPO = Path(__file__).resolve().parent.parent


def _report(violations: list[rules.Violation] | list[str]) -> str:
    return "\n".join(str(violation) for violation in violations)


# --- the repository ----------------------------------------------------------------------------


def test_sql_stays_in_storage() -> None:
    violations = rules.sql_outside_storage(REPO)
    assert not violations, "SQL outside duplex.storage:\n" + _report(violations)


def test_storage_imports_no_actor_cli_or_worker() -> None:
    violations = rules.storage_imports_upward(REPO)
    assert not violations, "duplex.storage imports upward:\n" + _report(violations)


def test_actors_import_only_forward_along_the_flow() -> None:
    violations = rules.actor_imports_backward(REPO)
    assert not violations, "actors importing backward:\n" + _report(violations)


def test_no_import_cycles() -> None:
    cycles = rules.import_cycles(REPO)
    assert not cycles, "import cycles among duplex modules:\n" + _report(cycles)


def test_modules_stay_small() -> None:
    violations = rules.oversized(REPO)
    assert not violations, "modules too large or too many:\n" + _report(violations)


def test_every_package_is_installed() -> None:
    violations = rules.unlisted_packages(REPO)
    assert not violations, "packages and pyproject.toml disagree:\n" + _report(violations)


def test_the_rules_see_the_whole_source() -> None:
    tree = rules.load(REPO)
    files = {
        path
        for folder in rules.SOURCE_ROOTS
        for path in (REPO / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert {module.path for module in tree.modules.values()} == files
    for module in tree.modules.values():
        folder, *parts = Path(module.rel).with_suffix("").parts
        if parts[-1:] == ["__init__"]:
            parts.pop()
        assert module.name == ".".join((rules.SOURCE_ROOTS[folder], *parts))


# --- a synthetic tree that keeps every rule ----------------------------------------------------

PYPROJECT = """\
[tool.setuptools]
package-dir = {"duplex" = "app", "duplex.actors" = "actors", "duplex.migrations" = "migrations"}
packages = [
    "duplex",
    "duplex.actors",
    "duplex.cli",
    "duplex.migrations",
    "duplex.migrations.versions",
    "duplex.storage",
]
"""

GOOD = {
    "app/__init__.py": """\
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            from duplex.client import Client
        """,
    "app/client.py": """\
        from sqlalchemy.exc import IntegrityError

        from duplex.storage.db import Database
        from duplex.storage.queries import submit


        class Client:
            def __init__(self, db: Database) -> None:
                self.db = db

            def submit(self) -> None:
                try:
                    with self.db.write() as conn:  # the door to a transaction
                        submit(conn)
                except IntegrityError:
                    pass
        """,
    "app/storage/__init__.py": "",
    "app/storage/db.py": """\
        import sqlite3

        from sqlalchemy import Connection, create_engine, text


        class Database:
            def __init__(self, url: str) -> None:
                self.engine = create_engine(url)

            def write(self):
                with self.engine.connect() as conn, conn.begin():
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                    yield conn
        """,
    "app/storage/models.py": """\
        from sqlalchemy import Column, Integer, MetaData, Table

        metadata = MetaData()
        steps = Table("steps", metadata, Column("id", Integer))
        """,
    "app/storage/queries.py": """\
        from sqlalchemy import insert

        from . import models
        from .db import Database


        def submit(conn):
            conn.execute(insert(models.steps))
        """,
    "app/cli/__init__.py": "",
    "app/cli/main.py": """\
        from sqlalchemy import Connection
        from sqlalchemy.engine import make_url

        from ..storage.db import Database
        from ..storage.queries import submit


        def run(url: str) -> None:
            db = Database(url)
            with db.write() as conn:
                submit(conn)
            result = None
            if result is not None:
                result.scalar()  # a result's value: no SQL runs


        def describe(conn: Connection) -> str:
            return str(make_url("sqlite://"))
        """,
    "actors/__init__.py": "",
    "actors/supervised.py": """\
        class SupervisedActor:
            pass
        """,
    "actors/ports.py": """\
        from typing import Protocol

        from .supervised import SupervisedActor


        class Peer(Protocol):
            def tell(self) -> None: ...
        """,
    "actors/event_system.py": """\
        from typing import TYPE_CHECKING

        from duplex.actors.supervised import SupervisedActor

        if TYPE_CHECKING:
            from duplex.actors.command_processor import CommandProcessor


        class EventSystem:
            def start(self, peer) -> None:
                peer.connect(self)  # an actor's connect(peer): no database involved
        """,
    "actors/command_processor.py": """\
        from .dispatcher import Dispatcher
        from .ports import Peer


        class CommandProcessor:
            def run(self, db) -> None:
                from duplex.actors import relay

                with db.read() as conn:
                    relay.send(conn)
        """,
    "actors/dispatcher.py": """\
        class Dispatcher:
            pass
        """,
    "actors/relay.py": """\
        from duplex.actors import ports


        def send(conn) -> None:
            pass
        """,
    "migrations/__init__.py": "",
    "migrations/versions/__init__.py": "",
    "migrations/versions/0001_initial.py": """\
        import sqlalchemy as sa
        from alembic import op


        def upgrade() -> None:
            op.execute(sa.text("CREATE TABLE steps (id INTEGER)"))
        """,
}


def make_tree(root: Path, files: dict[str, str], *, pyproject: str = PYPROJECT) -> Path:
    """Write ``GOOD`` with ``files`` laid over it, and ``pyproject``."""
    for rel, text in {**GOOD, **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    (root / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    return root


ALL_RULES = [
    rules.sql_outside_storage,
    rules.storage_imports_upward,
    rules.actor_imports_backward,
    rules.oversized,
    rules.unlisted_packages,
]


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda rule: rule.__name__)
def test_a_tree_that_keeps_the_rules_passes(tmp_path: Path, rule) -> None:
    root = make_tree(tmp_path, {})
    assert rule(root) == []


def test_a_tree_without_cycles_passes(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {})
    assert rules.import_cycles(root) == []


def test_imports_are_resolved_everywhere_they_stand(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {})
    tree = rules.load(root)
    deps = {
        (dep.target, dep.ref.line, dep.ref.type_checking)
        for dep in tree.dependencies(tree.modules["duplex.actors.command_processor"])
    }
    assert deps == {
        ("duplex.actors.dispatcher", 1, False),  # relative
        ("duplex.actors.ports", 2, False),
        ("duplex.actors.relay", 7, False),  # inside a function, a submodule via its package
    }
    [dep] = [
        dep
        for dep in tree.dependencies(tree.modules["duplex.actors.event_system"])
        if dep.target == "duplex.actors.command_processor"
    ]
    assert dep.ref.type_checking
    # A name the package's __init__ defines is an edge to the package module.
    [client] = tree.dependencies(tree.modules["duplex"])
    assert (client.target, client.ref.type_checking) == ("duplex.client", True)


# --- 1. SQL stays in storage -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (1, "from sqlalchemy import select"),
        (1, "from sqlalchemy import text, Connection"),
        (1, "from sqlalchemy import func"),
        (1, "from sqlalchemy import create_engine"),
        (1, "from sqlalchemy.orm import Session"),
        (1, "import sqlalchemy as sa"),
        (1, "import sqlite3"),
        (1, "import psycopg"),
        (1, "from alembic import command"),
        (1, "from duplex.storage.models import steps"),
        (1, "from ..storage import models"),
        (3, "import typing\nif typing.TYPE_CHECKING:\n    from sqlalchemy import delete"),
        (2, "def f(conn):\n    conn.execute(statement)"),
        (2, "def f(conn):\n    return conn.exec_driver_sql('SELECT 1').scalar()"),
        (2, "def f(conn, statement):\n    return conn.scalar(statement)"),
        (2, "def f(db):\n    with db.engine.connect() as conn:\n        pass"),
        (2, "def f(engine):\n    return engine.connect()"),
        (2, "def f(engine):\n    with engine.begin():\n        pass"),
        (2, "def f(conn):\n    conn.begin_nested()"),
        (2, "def f(db):\n    with db._transaction(write=True):\n        pass"),
    ],
)
def test_sql_outside_storage_is_caught(tmp_path: Path, line: int, code: str) -> None:
    root = make_tree(tmp_path, {"app/cli/rogue.py": code + "\n"})
    violations = rules.sql_outside_storage(root)
    assert [(v.path, v.line, v.module) for v in violations] == [
        ("app/cli/rogue.py", line, "duplex.cli.rogue")
    ], _report(violations)
    assert str(violations[0]).startswith(f"app/cli/rogue.py:{line} (duplex.cli.rogue): ")


def test_sql_in_an_actor_is_caught(tmp_path: Path) -> None:
    actor = """\
        class Dispatcher:
            def claim(self, db) -> None:
                with db.write() as conn:
                    conn.execute("UPDATE steps SET state = 'claimed'")
        """
    root = make_tree(tmp_path, {"actors/dispatcher.py": actor})
    assert [str(v) for v in rules.sql_outside_storage(root)] == [
        "actors/dispatcher.py:4 (duplex.actors.dispatcher): runs SQL or opens a transaction "
        "itself: .execute(…); go through Database.read()/write() and a duplex.storage function"
    ]


# --- 2. storage depends on nothing above it ----------------------------------------------------


@pytest.mark.parametrize(
    ("line", "code", "imported"),
    [
        (1, "from duplex.actors.relay import send", "duplex.actors.relay"),
        (1, "from duplex.actors import ports", "duplex.actors.ports"),
        (1, "from ..cli import main", "duplex.cli.main"),
        (2, "def f():\n    import duplex.cli.main", "duplex.cli.main"),
        (1, "from duplex.worker.wiring import Worker", "duplex.worker.wiring"),
        (3, "import typing\nif typing.TYPE_CHECKING:\n    from duplex.cli import main", "main"),
    ],
)
def test_storage_importing_upward_is_caught(
    tmp_path: Path, line: int, code: str, imported: str
) -> None:
    # The tree has no duplex.worker: an import names its module even when it is missing.
    root = make_tree(tmp_path, {"app/storage/rogue.py": code + "\n"})
    violations = rules.storage_imports_upward(root)
    assert [(v.path, v.line, v.module) for v in violations] == [
        ("app/storage/rogue.py", line, "duplex.storage.rogue")
    ], _report(violations)
    assert imported in violations[0].text


# --- 3. actors import only forward along the flow ----------------------------------------------


def test_an_actor_importing_backward_is_caught(tmp_path: Path) -> None:
    dispatcher = """\
        from typing import TYPE_CHECKING

        from .ports import Peer

        if TYPE_CHECKING:
            from .command_processor import CommandProcessor


        class Dispatcher:
            def tell(self) -> None:
                from duplex.actors.event_system import EventSystem
        """
    root = make_tree(tmp_path, {"actors/dispatcher.py": dispatcher})
    assert [str(v) for v in rules.actor_imports_backward(root)] == [
        "actors/dispatcher.py:6 (duplex.actors.dispatcher): imports "
        "duplex.actors.command_processor, which comes earlier in the flow (under TYPE_CHECKING): "
        "from duplex.actors.command_processor import CommandProcessor",
        "actors/dispatcher.py:11 (duplex.actors.dispatcher): imports duplex.actors.event_system, "
        "which comes earlier in the flow: from duplex.actors.event_system import EventSystem",
    ]


def test_a_shared_module_importing_an_actor_is_caught(tmp_path: Path) -> None:
    ports = """\
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            from duplex.actors.relay import send
        """
    root = make_tree(tmp_path, {"actors/ports.py": ports})
    violations = rules.actor_imports_backward(root)
    assert [(v.path, v.line) for v in violations] == [("actors/ports.py", 4)], _report(violations)
    assert "shared actor module imports the flow's actor duplex.actors.relay" in violations[0].text


def test_an_actor_module_outside_the_flow_is_caught(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"actors/timer.py": "class TimerActor: ...\n"})
    violations = rules.actor_imports_backward(root)
    assert [(v.path, v.module) for v in violations] == [("actors/timer.py", "duplex.actors.timer")]
    assert "no place in the flow" in violations[0].text


# --- 4. no import cycles -----------------------------------------------------------------------


def test_an_import_cycle_is_caught(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        {
            "app/storage/queries.py": textwrap.dedent(GOOD["app/storage/queries.py"])
            + "\n\ndef late():\n    from duplex.client import Client\n",
        },
    )
    [cycle] = rules.import_cycles(root)
    assert cycle.splitlines()[0] == (
        "cycle duplex.client [app/client.py:4] -> duplex.storage.queries "
        "[app/storage/queries.py:12] -> duplex.client"
    )
    # The cycle runs through the function's import; every import inside it is listed.
    assert "duplex.storage.queries -> duplex.client [app/storage/queries.py:12]" in cycle


def test_a_cycle_under_type_checking_is_caught(tmp_path: Path) -> None:
    dispatcher = """\
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            from duplex.actors.command_processor import CommandProcessor
        """
    root = make_tree(tmp_path, {"actors/dispatcher.py": dispatcher})
    [cycle] = rules.import_cycles(root)
    assert cycle.splitlines()[0] == (
        "cycle duplex.actors.command_processor [actors/command_processor.py:1] -> "
        "duplex.actors.dispatcher [actors/dispatcher.py:4, under TYPE_CHECKING] -> "
        "duplex.actors.command_processor"
    )


def test_a_cycle_through_a_package_init_is_caught(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        {
            "app/storage/__init__.py": "from duplex.storage.db import Database\nLIMIT = 5\n",
            "app/storage/db.py": "from duplex.storage import LIMIT\n",
        },
    )
    [cycle] = rules.import_cycles(root)
    assert cycle.splitlines()[0] == (
        "cycle duplex.storage [app/storage/__init__.py:1] -> duplex.storage.db "
        "[app/storage/db.py:1] -> duplex.storage"
    )


def test_a_submodule_taken_from_its_package_is_no_cycle(tmp_path: Path) -> None:
    # The package runs its __init__ first, and that finished before db started: no cycle.
    root = make_tree(
        tmp_path,
        {
            "app/storage/__init__.py": "from duplex.storage.db import Database\n",
            "app/storage/db.py": "from duplex.storage import models\n",
        },
    )
    assert rules.import_cycles(root) == []


def test_a_module_importing_itself_is_a_cycle(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"app/cli/main.py": "def f():\n    from . import main\n"})
    [cycle] = rules.import_cycles(root)
    assert cycle.splitlines()[0] == "cycle duplex.cli.main [app/cli/main.py:2] -> duplex.cli.main"


def test_strongly_connected_components() -> None:
    graph = {"a": ["b"], "b": ["c", "d"], "c": ["a"], "d": ["e"], "e": ["d"], "f": ["a"]}
    components = rules.strongly_connected(graph)
    assert sorted(sorted(c) for c in components) == [["a", "b", "c"], ["d", "e"], ["f"]]


# --- 5. sizes ----------------------------------------------------------------------------------


def test_too_many_top_level_modules_are_caught(tmp_path: Path) -> None:
    # GOOD has two modules directly in app/; fourteen more make sixteen, the most allowed.
    extra = {f"app/extra_{n:02}.py": "" for n in range(rules.MAX_TOP_LEVEL_MODULES - 2)}
    root = make_tree(tmp_path, extra)
    assert rules.oversized(root) == []
    root = make_tree(tmp_path, {"app/one_too_many.py": ""})
    [violation] = rules.oversized(root)
    assert violation.path == "app/"
    assert violation.text.startswith("17 modules directly in app/, at most 16: ")
    assert "one_too_many.py" in violation.text


@pytest.mark.parametrize(
    ("rel", "module"),
    [
        ("app/cli/big.py", "duplex.cli.big"),
        ("app/big.py", "duplex.big"),
        ("actors/dispatcher.py", "duplex.actors.dispatcher"),
    ],
)
def test_a_long_module_is_caught(tmp_path: Path, rel: str, module: str) -> None:
    limit = rules.MAX_LINES
    root = make_tree(tmp_path, {rel: "x = 1\n" * limit})
    assert rules.oversized(root) == []
    root = make_tree(tmp_path, {rel: "x = 1\n" * (limit + 1)})
    assert [str(v) for v in rules.oversized(root)] == [
        f"{rel}:401 ({module}): 401 lines, at most 400"
    ]


def test_a_long_migration_is_allowed(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"migrations/versions/0002_big.py": "x = 1\n" * 900})
    assert rules.oversized(root) == []


# --- 6. every package is installed -------------------------------------------------------------


def test_an_unlisted_package_is_caught(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"app/intake/__init__.py": "", "app/intake/credits.py": ""})
    assert [str(v) for v in rules.unlisted_packages(root)] == [
        "app/intake/__init__.py:1 (duplex.intake): package not listed in pyproject.toml "
        "[tool.setuptools] packages"
    ]


def test_an_unlisted_nested_package_is_caught(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"migrations/versions/extra/__init__.py": ""})
    [violation] = rules.unlisted_packages(root)
    assert violation.module == "duplex.migrations.versions.extra"


def test_a_listed_package_that_is_gone_is_caught(tmp_path: Path) -> None:
    pyproject = PYPROJECT.replace('"duplex.cli",', '"duplex.cli",\n    "duplex.gone",')
    root = make_tree(tmp_path, {}, pyproject=pyproject)
    assert [str(v) for v in rules.unlisted_packages(root)] == [
        "pyproject.toml:0 (duplex.gone): listed in [tool.setuptools] packages, "
        "but no such package folder exists"
    ]


def test_a_folder_of_modules_without_init_is_caught(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"app/loose/helpers.py": "X = 1\n"})
    [violation] = rules.unlisted_packages(root)
    assert (violation.path, violation.module) == ("app/loose/", "duplex.loose")
    assert "no __init__.py" in violation.text
