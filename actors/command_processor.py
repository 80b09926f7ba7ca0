"""[2] CommandProcessor: pure routing of commands to the actor that carries them out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pykka

from app.messages import Command, ExecuteReadySteps, Shutdown, Status

if TYPE_CHECKING:
    from actors.dispatcher import DispatcherProxy
    from actors.step_executor import StepExecutorProxy


class CommandProcessor(pykka.ThreadingActor):
    """Route ``ExecuteReadySteps``, ``Status`` and ``Shutdown``; decide nothing else."""

    def __init__(self, executor: StepExecutorProxy, dispatcher: DispatcherProxy) -> None:
        super().__init__()
        self._executor = executor
        self._dispatcher = dispatcher

    def handle(self, command: Command) -> Any:
        match command:
            case ExecuteReadySteps(limit=limit):
                self._executor.execute.defer(limit)
                return None
            case Status():
                # Hand back the future; waiting on it here would block this actor.
                return self._dispatcher.stats()
            case Shutdown():
                self._dispatcher.drain.defer()
                return None
        raise TypeError(f"unknown command: {command!r}")


CommandProcessorProxy = pykka.ActorProxy[CommandProcessor]
