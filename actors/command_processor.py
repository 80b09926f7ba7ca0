"""[2] CommandProcessor: pure routing of commands to the actor that carries them out."""

from __future__ import annotations

from typing import Any

from duplex.actors.dispatcher import DispatcherProxy
from duplex.actors.proxy import TypedProxy, message
from duplex.actors.step_executor import StepExecutorProxy
from duplex.actors.supervised import SupervisedActor, tell
from duplex.messages import Command, ExecuteReadySteps, Shutdown, Status
from duplex.worker.supervision import Supervisor


class CommandProcessor(SupervisedActor):
    """Route ``ExecuteReadySteps``, ``Status`` and ``Shutdown``; decide nothing else."""

    def __init__(
        self,
        executor: StepExecutorProxy,
        dispatcher: DispatcherProxy,
        supervisor: Supervisor | None = None,
    ) -> None:
        super().__init__(supervisor)
        self._executor = executor
        self._dispatcher = dispatcher

    def handle(self, command: Command) -> Any:
        match command:
            case ExecuteReadySteps(limit=limit):
                tell(self._executor.execute, limit)
                return None
            case Status():
                # Hand back the future; waiting on it here would block this actor.
                return self._dispatcher.stats()
            case Shutdown():
                tell(self._dispatcher.drain)
                return None
        raise TypeError(f"unknown command: {command!r}")


class CommandProcessorProxy(TypedProxy[CommandProcessor]):
    """The CommandProcessor's one message."""

    handle = message(CommandProcessor.handle)
