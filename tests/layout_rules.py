"""House rules for the layout of Duplex's source, checked by reading it (``ast``), not importing it.

The source lives in three folders that install as one package (pyproject ``package-dir``):
``app/x/y.py`` is ``duplex.x.y``, ``actors/z.py`` is ``duplex.actors.z`` and
``migrations/m.py`` is ``duplex.migrations.m``. Every import counts wherever it stands: at the
top, inside a function, under ``if TYPE_CHECKING:``; relative imports are resolved, and so is
``importlib.import_module("duplex.…")`` with a literal name.

An import of ``duplex.p.q`` is an edge to the module ``duplex.p.q``. ``from duplex.p import n`` is
an edge to ``duplex.p.n`` when that is a module, and otherwise to the package module
``duplex.p`` (its ``__init__``, which defines ``n``). Parent packages that Python initialises on
the way are not edges: they always finish before the module that was asked for starts, so they
can never be part of a cycle a reader has to untangle.

The rules, each a function that takes the repository root and returns the violations, so that
tests run them on the real tree and on small synthetic ones:

1. ``sql_outside_storage``: SQL stays in ``duplex.storage`` (migrations excepted). Storage's
   ``Database.read()`` and ``Database.write()`` are the only doors to the database: they open
   the transaction with SQLite's ``BEGIN IMMEDIATE``, queue SQLite writers on the process's
   write lock and turn driver errors into ``StorageError``. The code that decides what one unit
   of work is (an actor, a CLI command, a dashboard request) may choose where a transaction
   starts and ends by going through those doors, ``with db.write() as conn:``, and then pass
   ``conn`` to storage functions, which hold every statement. Creating the engine through
   storage (``Database(settings)``, ``create_database_engine``) is fine too: an engine runs no
   SQL. Outside storage a module may therefore not

   - run a statement or open a connection or transaction by itself: call ``.execute(``,
     ``.executemany(``, ``.executescript(``, ``.exec_driver_sql(``, ``.begin(``,
     ``.begin_nested(``, ``.begin_twophase(``, ``.raw_connection(``, ``._transaction(``,
     ``.scalar(statement)``/``.scalars(statement)`` (with an argument: a connection's, not a
     result's), ``.connect()`` without arguments (an engine's; an actor's ``connect(peer)``
     takes one) or any ``….engine.connect(``;
   - import SQLAlchemy beyond the names needed to annotate and to catch its errors
     (``SQLALCHEMY_ALLOWED``): no ``select``, ``insert``, ``update``, ``delete``, ``text``,
     ``func``, ``Table``, ``create_engine``, ``event``, no ``sqlalchemy.sql``/``orm``, no bare
     ``import sqlalchemy``;
   - import a database driver or Alembic (``DRIVERS``);
   - import a storage module that defines tables (one that imports ``Table`` or ``MetaData``
     from SQLAlchemy): statements are built from those, in storage.

2. ``storage_imports_upward``: ``duplex.storage`` imports no actor, CLI or worker module.
3. ``actor_imports_backward``: actors import only forward along the flow (``FLOW``); the shared
   modules (``SHARED_ACTOR_MODULES`` and the package's ``__init__``) are importable by all and so
   import no actor of the flow themselves; every other module in ``actors/`` must be given a
   place in one of the two, or the rule cannot judge it.
4. ``import_cycles``: no cycle among ``duplex`` modules (strongly connected components, Tarjan);
   each component is reported as its shortest cycle through one member, followed by every
   import inside the component, since any of them may be the one to break.
5. ``oversized``: at most ``MAX_TOP_LEVEL_MODULES`` files directly in ``app/``, and no module in
   ``app/`` or ``actors/`` over ``MAX_LINES`` lines.
6. ``unlisted_packages``: every package folder (one with ``__init__.py``) is listed in
   pyproject's ``[tool.setuptools] packages`` under its ``duplex`` name, every listed package
   exists, and no folder holds modules without an ``__init__.py`` (they would not be installed).
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

# Source folder -> the package it installs as.
SOURCE_ROOTS = {"app": "duplex", "actors": "duplex.actors", "migrations": "duplex.migrations"}
STORAGE = "duplex.storage"
MIGRATIONS = "duplex.migrations"
ACTORS = "duplex.actors"

SQL_CALLS = frozenset(
    {
        "execute",
        "executemany",
        "executescript",
        "exec_driver_sql",
        "begin",
        "begin_nested",
        "begin_twophase",
        "raw_connection",
        "_transaction",
    }
)
# Names outside storage may take from SQLAlchemy: types for annotations, URL parsing, errors.
_SQLALCHEMY_TYPES = frozenset(
    {"Connection", "Engine", "Result", "CursorResult", "Row", "RowMapping", "URL", "make_url"}
)
SQLALCHEMY_ALLOWED: dict[str, frozenset[str] | None] = {  # None: every name
    "sqlalchemy": _SQLALCHEMY_TYPES | {"exc"},
    "sqlalchemy.engine": _SQLALCHEMY_TYPES,
    "sqlalchemy.exc": None,
}
DRIVERS = frozenset({"sqlite3", "psycopg", "psycopg2", "psycopg_pool", "asyncpg", "alembic"})
TABLE_NAMES = frozenset({"Table", "MetaData"})

STORAGE_MUST_NOT_IMPORT = ("duplex.actors", "duplex.cli", "duplex.worker")

# The actors in the order work flows through them; each may import only those after it.
FLOW = (
    "event_system",  # EventSystem
    "command_processor",  # CommandProcessor
    "step_executor",  # StepExecutor
    "dispatcher",  # Dispatcher
    "handler_worker",  # HandlerWorker
    "completion_processor",  # CompletionProcessor
    "event_publisher",  # DomainEventPublisher
    "relay",  # RelayActor
)
SHARED_ACTOR_MODULES = frozenset({"supervised", "ports", "proxy"})

MAX_TOP_LEVEL_MODULES = 16
MAX_LINES = 400


@dataclass(frozen=True)
class Violation:
    path: str  # relative to the root
    line: int
    module: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.module}): {self.text}"


@dataclass(frozen=True)
class ImportRef:
    """One imported module, or one name taken from a module, at a line of the importer."""

    line: int
    target: str  # the absolute module named by the statement
    name: str | None  # the name taken from it (``from target import name``), if any
    type_checking: bool

    @property
    def where(self) -> str:
        return " (under TYPE_CHECKING)" if self.type_checking else ""

    @property
    def spelled(self) -> str:
        return f"from {self.target} import {self.name}" if self.name else f"import {self.target}"


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    rel: str
    is_package: bool
    tree: ast.Module
    lines: int
    imports: tuple[ImportRef, ...]


@dataclass(frozen=True)
class Dependency:
    target: str  # a module of the tree
    ref: ImportRef
    source_path: str  # of the importing module, relative to the root

    @property
    def place(self) -> str:
        under = ", under TYPE_CHECKING" if self.ref.type_checking else ""
        return f"{self.source_path}:{self.ref.line}{under}"


class Tree:
    """The parsed modules under ``root``'s source folders, and the imports among them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: dict[str, Module] = {}
        for folder, package in SOURCE_ROOTS.items():
            base = root / folder
            if not base.is_dir():
                continue
            for path in sorted(base.rglob("*.py")):
                if "__pycache__" in path.parts:
                    continue
                parts = path.relative_to(base).with_suffix("").parts
                is_package = parts[-1] == "__init__"
                name = ".".join((package, *(parts[:-1] if is_package else parts)))
                text = path.read_text(encoding="utf-8")
                rel = path.relative_to(root).as_posix()
                tree = ast.parse(text, filename=rel)
                imports = tuple(_imports(tree, name, is_package))
                lines = len(text.splitlines())
                self.modules[name] = Module(name, path, rel, is_package, tree, lines, imports)

    def dependencies(self, module: Module) -> Iterator[Dependency]:
        """The modules of the tree that ``module`` imports (see the module docstring)."""
        for ref in module.imports:
            target = self.resolve(ref)
            if target is not None:
                yield Dependency(target, ref, module.rel)

    def resolve(self, ref: ImportRef) -> str | None:
        """The ``duplex`` module ``ref`` imports (named even when the tree lacks it), or None."""
        if not within(ref.target, "duplex"):
            return None
        if ref.name is not None and ref.name != "*":
            submodule = f"{ref.target}.{ref.name}"
            if submodule in self.modules:
                return submodule
        return ref.target

    def violation(self, module: Module, line: int, text: str) -> Violation:
        return Violation(module.rel, line, module.name, text)


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.refs: list[ImportRef] = []
        self.type_checking = False

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        outer, self.type_checking = self.type_checking, True
        for statement in node.body:
            self.visit(statement)
        self.type_checking = outer
        for statement in node.orelse:
            self.visit(statement)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.refs.append(ImportRef(node.lineno, alias.name, None, self.type_checking))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module or ""
        for alias in node.names:
            self.refs.append(ImportRef(node.lineno, target, alias.name, self.type_checking))

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("duplex.x") with a literal name is an import too.
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if called == "import_module" and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                self.refs.append(ImportRef(node.lineno, first.value, None, self.type_checking))
        self.generic_visit(node)


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _imports(tree: ast.Module, module: str, is_package: bool) -> list[ImportRef]:
    collector = _ImportCollector(module, is_package)
    collector.visit(tree)
    return collector.refs


def load(root: Path) -> Tree:
    return Tree(root)


# --- 1. SQL stays in storage -------------------------------------------------------------------


def sql_outside_storage(root: Path) -> list[Violation]:
    tree = load(root)
    table_modules = {
        name
        for name, module in tree.modules.items()
        if within(name, STORAGE)
        and any(
            ref.target.split(".")[0] == "sqlalchemy" and ref.name in TABLE_NAMES
            for ref in module.imports
        )
    }
    found: list[Violation] = []
    for module in tree.modules.values():
        if within(module.name, STORAGE) or within(module.name, MIGRATIONS):
            continue
        for ref in module.imports:
            problem = _sql_import_problem(ref)
            if problem:
                found.append(tree.violation(module, ref.line, f"{problem}: {ref.spelled}"))
        for dep in tree.dependencies(module):
            if dep.target in table_modules:
                found.append(
                    tree.violation(
                        module,
                        dep.ref.line,
                        f"imports the table definitions of {dep.target}{dep.ref.where}: "
                        "statements are built in storage",
                    )
                )
        for node in ast.walk(module.tree):
            call = _sql_call(node) if isinstance(node, ast.Call) else None
            if call and isinstance(node, ast.Call):
                found.append(
                    tree.violation(
                        module,
                        node.lineno,
                        f"runs SQL or opens a transaction itself: .{call}(…); go through "
                        "Database.read()/write() and a duplex.storage function",
                    )
                )
    return sorted(found, key=lambda v: (v.path, v.line))


def _sql_import_problem(ref: ImportRef) -> str | None:
    top = ref.target.split(".")[0]
    if top in DRIVERS:
        return f"imports the database driver or migration tool {top}{ref.where}"
    if top != "sqlalchemy":
        return None
    if ref.name is None:
        if ref.target in SQLALCHEMY_ALLOWED and SQLALCHEMY_ALLOWED[ref.target] is None:
            return None
        return f"imports SQLAlchemy wholesale{ref.where}; take only types and errors"
    allowed = SQLALCHEMY_ALLOWED.get(ref.target, frozenset())
    if allowed is None or ref.name in allowed:
        return None
    return f"imports a SQLAlchemy construct outside storage{ref.where}"


def _sql_call(node: ast.Call) -> str | None:
    if not isinstance(node.func, ast.Attribute):
        return None
    method = node.func.attr
    if method in SQL_CALLS:
        return method
    if method in {"scalar", "scalars"} and (node.args or node.keywords):
        return method  # Connection.scalar(statement) runs it; Result.scalar() does not
    if method == "connect":
        receiver = node.func.value
        on_engine = (isinstance(receiver, ast.Name) and receiver.id.endswith("engine")) or (
            isinstance(receiver, ast.Attribute) and receiver.attr.endswith("engine")
        )
        if on_engine or not (node.args or node.keywords):
            return method
    return None


# --- 2. storage depends on nothing above it ----------------------------------------------------


def storage_imports_upward(root: Path) -> list[Violation]:
    tree = load(root)
    found = []
    for module in tree.modules.values():
        if not within(module.name, STORAGE):
            continue
        for dep in tree.dependencies(module):
            if any(within(dep.target, upper) for upper in STORAGE_MUST_NOT_IMPORT):
                found.append(
                    tree.violation(
                        module,
                        dep.ref.line,
                        f"storage imports {dep.target}{dep.ref.where}: {dep.ref.spelled}",
                    )
                )
    return found


# --- 3. actors import only forward along the flow ----------------------------------------------


def actor_imports_backward(root: Path) -> list[Violation]:
    tree = load(root)
    found = []
    for module in tree.modules.values():
        if not within(module.name, ACTORS):
            continue
        own = _actor_place(module.name)
        if own is None:
            found.append(
                tree.violation(
                    module,
                    1,
                    f"actor module has no place in the flow: add it to FLOW or "
                    f"SHARED_ACTOR_MODULES in {Path(__file__).name}",
                )
            )
            continue
        for dep in tree.dependencies(module):
            if not within(dep.target, ACTORS):
                continue
            other = _actor_place(dep.target)
            if other is None or other == "shared" or other == own:
                continue
            if own == "shared":
                text = f"shared actor module imports the flow's actor {dep.target}"
            elif FLOW.index(other) < FLOW.index(own):
                text = f"imports {dep.target}, which comes earlier in the flow"
            else:
                continue
            found.append(
                tree.violation(module, dep.ref.line, f"{text}{dep.ref.where}: {dep.ref.spelled}")
            )
    return found


def _actor_place(name: str) -> str | None:
    """The module's stage in ``FLOW``, ``"shared"``, or None when it has no place."""
    if name == ACTORS:
        return "shared"
    stem = name.removeprefix(ACTORS + ".").split(".")[0]
    if stem in SHARED_ACTOR_MODULES:
        return "shared"
    return stem if stem in FLOW else None


# --- 4. no import cycles -----------------------------------------------------------------------


def import_cycles(root: Path) -> list[str]:
    """One line per strongly connected component: a cycle through it, each edge with its line."""
    tree = load(root)
    edges: dict[str, dict[str, Dependency]] = {}
    for module in tree.modules.values():
        edges[module.name] = {}
        for dep in tree.dependencies(module):
            if dep.target in tree.modules:  # an import of a missing module fails on its own
                edges[module.name].setdefault(dep.target, dep)
    reports = []
    for component in strongly_connected({name: sorted(targets) for name, targets in edges.items()}):
        if len(component) == 1:
            (only,) = component
            if only not in edges[only]:
                continue
        cycle = _cycle_through(sorted(component)[0], component, edges)
        path = "".join(
            f"{source} [{edges[source][target].place}] -> " for source, target in pairwise(cycle)
        )
        inside = "; ".join(
            f"{source} -> {target} [{dep.place}]"
            for source in sorted(component)
            for target, dep in sorted(edges[source].items())
            if target in component
        )
        reports.append(f"cycle {path}{cycle[-1]}\n    all imports inside the cycle: {inside}")
    return sorted(reports)


def strongly_connected(graph: dict[str, list[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit to meet)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(graph.get(successor, []))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    components.append(component)
    return components


def _cycle_through(
    start: str, component: set[str], edges: dict[str, dict[str, Dependency]]
) -> list[str]:
    """The shortest path start -> … -> start inside the component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(edges[node]):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if target in component and target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{start} is on no cycle of its component")


# --- 5. sizes ----------------------------------------------------------------------------------


def oversized(root: Path) -> list[Violation]:
    tree = load(root)
    found = []
    top_level = sorted(path.name for path in (root / "app").glob("*.py"))
    if len(top_level) > MAX_TOP_LEVEL_MODULES:
        found.append(
            Violation(
                "app/",
                0,
                "duplex",
                f"{len(top_level)} modules directly in app/, at most {MAX_TOP_LEVEL_MODULES}: "
                f"{', '.join(top_level)}",
            )
        )
    for module in tree.modules.values():
        if within(module.name, MIGRATIONS):
            continue
        if module.lines > MAX_LINES:
            found.append(
                tree.violation(
                    module,
                    MAX_LINES + 1,
                    f"{module.lines} lines, at most {MAX_LINES}",
                )
            )
    return found


# --- 6. every package is installed -------------------------------------------------------------


def unlisted_packages(root: Path) -> list[Violation]:
    pyproject = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(pyproject.get("tool", {}).get("setuptools", {}).get("packages", []))
    found = []
    present = set()
    for folder, package in SOURCE_ROOTS.items():
        base = root / folder
        if not base.is_dir():
            continue
        for directory in sorted([base, *(p for p in base.rglob("*") if p.is_dir())]):
            if "__pycache__" in directory.parts:
                continue
            parts = directory.relative_to(base).parts
            name = ".".join((package, *parts))
            rel = directory.relative_to(root).as_posix()
            if (directory / "__init__.py").is_file():
                present.add(name)
                if name not in listed:
                    found.append(
                        Violation(
                            f"{rel}/__init__.py",
                            1,
                            name,
                            "package not listed in pyproject.toml [tool.setuptools] packages",
                        )
                    )
            elif any(directory.glob("*.py")):
                found.append(
                    Violation(
                        f"{rel}/",
                        0,
                        name,
                        "folder holds modules but has no __init__.py: it would not be installed",
                    )
                )
    for name in sorted(listed - present):
        found.append(
            Violation(
                "pyproject.toml",
                0,
                name,
                "listed in [tool.setuptools] packages, but no such package folder exists",
            )
        )
    return found
