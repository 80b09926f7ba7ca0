"""Actor modules import only forward along the flow, never back up it, not even for typing.

Calls back up the flow (claims made, slots freed, nudges) go through the protocols in
``duplex.actors.ports`` instead, so the modules of the actors form no import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ACTORS = Path(__file__).resolve().parent.parent / "actors"
# The flow, upstream first: EventSystem → CommandProcessor → StepExecutor → Dispatcher →
# HandlerWorker, and Dispatcher/HandlerWorker → CompletionProcessor → DomainEventPublisher →
# RelayActor.
FLOW = [
    "event_system",
    "command_processor",
    "step_executor",
    "dispatcher",
    "handler_worker",
    "completion_processor",
    "event_publisher",
    "relay",
]
# Shared by every actor; they import no actor module.
SHARED = {"proxy", "ports", "supervised"}


def actor_imports(module: str) -> set[str]:
    """The ``duplex.actors`` modules that ``module`` imports, anywhere in it."""
    tree = ast.parse((ACTORS / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.startswith("duplex.actors."):
                found.add(name.removeprefix("duplex.actors.").split(".")[0])
    return found


def test_every_actor_module_is_placed_on_the_flow() -> None:
    modules = {path.stem for path in ACTORS.glob("*.py")} - {"__init__"}
    assert modules == set(FLOW) | SHARED


@pytest.mark.parametrize("module", FLOW)
def test_an_actor_module_imports_only_actors_further_down(module: str) -> None:
    upstream = set(FLOW[: FLOW.index(module) + 1])
    assert not actor_imports(module) & upstream


@pytest.mark.parametrize("module", sorted(SHARED))
def test_the_shared_modules_import_no_actor(module: str) -> None:
    assert actor_imports(module) <= SHARED - {module}
