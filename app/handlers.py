"""Step handlers: the registry, the ``step_handler`` decorator and ``StepContext``.

Only handlers registered in code can run. A handler name read from the database is looked up
in the registry and never imported by path, so the database is not a way to run arbitrary code.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from loguru import logger

from duplex.errors import CheckpointRejected, ConfigurationError
from duplex.messages import ClaimedStep, EmittedEvent, JSONDict

if TYPE_CHECKING:
    from loguru import Logger

Handler = Callable[["StepContext"], Any] | Callable[["StepContext"], Awaitable[Any]]
H = TypeVar("H", bound=Callable[..., Any])


class Cancellation:
    """An Event-like flag a handler can check; set when its attempt is timed out or abandoned.

    Setting it also cancels a running ``async def`` handler for real. A hook registered with
    ``on_cancel`` is user code: it runs on a thread of its own, so one that raises or blocks
    never touches the Dispatcher that cancels.
    """

    def __init__(self) -> None:
        self._cancelled = False
        # Made by the first ``wait``: most attempts are never waited on, and an Event (a
        # Condition and its locks) per attempt showed in the cost of a no-op step.
        self._event: threading.Event | None = None
        self._lock = threading.Lock()
        self._on_cancel: Callable[[], None] | None = None
        self._canceller: Callable[[], None] | None = None

    def is_set(self) -> bool:
        return self._cancelled

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancelled or ``timeout`` seconds pass; return whether cancelled."""
        with self._lock:
            if self._cancelled:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def __bool__(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Set the flag, cancel an async handler, and start the user's hook on its own thread."""
        with self._lock:
            self._cancelled = True
            if self._event is not None:
                self._event.set()
            hook, self._on_cancel = self._on_cancel, None
            canceller, self._canceller = self._canceller, None
        if canceller is not None:
            try:
                canceller()
            except Exception:  # the handler's event loop already closed: nothing to cancel
                logger.debug("async handler already finished when cancelled")
        if hook is not None:
            threading.Thread(
                target=_run_hook, args=(hook,), name="duplex-cancel-hook", daemon=True
            ).start()

    def on_cancel(self, hook: Callable[[], None] | None) -> None:
        """Register (or clear) a hook; it runs at once, on this thread, if already cancelled."""
        with self._lock:
            if not self._cancelled or hook is None:
                self._on_cancel = hook
                return
        hook()

    def set_canceller(self, canceller: Callable[[], None] | None) -> None:
        """Duplex's own hook that cancels a running ``async def`` handler (quick, never user code).

        Kept apart from ``on_cancel`` so that a handler's own hook is never overwritten.
        """
        with self._lock:
            if not self._cancelled or canceller is None:
                self._canceller = canceller
                return
        canceller()


def _run_hook(hook: Callable[[], None]) -> None:
    try:
        hook()
    except Exception:
        logger.exception("a cancel hook (ctx.cancelled.on_cancel) raised")


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One item of a batch, as its convergence step reads it (``ctx.batch_results``)."""

    index: int
    state: str  # complete, resolved_manually or skipped
    result: JSONDict | None


class StepStore(Protocol):
    """Where a running attempt saves checkpoints and reads its batch's results
    (``duplex.storage.step_store``)."""

    def save_checkpoint(self, step: ClaimedStep, state: Any) -> bool:
        """Save ``state`` if ``step`` still holds its claim; return whether it did."""
        ...

    def batch_results(
        self, task_uuid: str, worker: str, *, after: int, limit: int
    ) -> list[BatchResult]:
        """Up to ``limit`` items of the batch whose item step is ``worker``, after ``after``."""
        ...


@dataclass
class StepContext:
    """Everything a handler gets about the step it runs."""

    task_uuid: str
    step_uuid: str
    step_name: str
    task_context: JSONDict
    inputs: JSONDict
    dependency_results: dict[str, JSONDict]
    attempt: int
    max_attempts: int
    deadline: datetime
    deadline_monotonic: float
    cancelled: Cancellation
    events: list[EmittedEvent] = field(default_factory=list)
    worker_id: str = ""
    # What the last accepted ``checkpoint`` of this step saved (None: none yet).
    checkpoint_state: Any = None
    # The parents a decision skipped: they ran not, and are not in ``dependency_results``.
    skipped_dependencies: tuple[str, ...] = ()
    # The claim this attempt runs under, and the store its checkpoints go to.
    claim: ClaimedStep | None = field(default=None, repr=False)
    store: StepStore | None = field(default=None, repr=False)

    @cached_property
    def logger(self) -> Logger:
        """A logger that tags every line with the step (bound on first use: most handlers
        never log, and binding costs on every attempt)."""
        return bind_logger(
            task_uuid=self.task_uuid,
            step_uuid=self.step_uuid,
            step_name=self.step_name,
            attempt=self.attempt,
            worker_id=self.worker_id,
        )

    def emit(self, name: str, payload: JSONDict | None = None) -> None:
        """Record a domain event; it is committed with this attempt's result."""
        if not isinstance(name, str) or not name:
            raise ValueError("an event name must be a non-empty string")
        payload = {} if payload is None else payload
        try:
            encoded = json.dumps([name, payload], allow_nan=False, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"event {name!r} payload is not JSON-serialisable: {exc}") from None
        if "\\u0000" in encoded.replace("\\\\", ""):
            raise ValueError(f"event {name!r} contains a NUL character, which cannot be stored")
        try:
            encoded.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"event {name!r} contains text that is not valid Unicode") from None
        # Keep a copy: the handler may go on changing its dict after emitting it.
        self.events.append(EmittedEvent(name, json.loads(encoded)[1]))

    def checkpoint(self, state: Any) -> None:
        """Save ``state`` (a JSON value) durably now; the next attempt of this step, after a
        retry or a lost worker, reads it as ``ctx.checkpoint_state`` and resumes from it.

        Written under the same guard as results: if this attempt no longer holds its claim
        (it timed out, was recovered as lost, or its task was cancelled), nothing is saved and
        ``CheckpointRejected`` is raised, so a stale attempt stops instead of going on.
        """
        try:
            encoded = json.dumps(state, allow_nan=False, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint state is not JSON-serialisable: {exc}") from None
        if "\\u0000" in encoded.replace("\\\\", ""):
            raise ValueError("checkpoint state contains a NUL character, which cannot be stored")
        if self.store is None or self.claim is None:
            raise RuntimeError("this step runs without a checkpoint store (not in a worker)")
        saved = json.loads(encoded)
        if not self.store.save_checkpoint(self.claim, saved):
            raise CheckpointRejected(
                f"checkpoint of step {self.step_name} ({self.step_uuid}) attempt "
                f"{self.attempt} rejected: the attempt no longer holds its claim (timed out, "
                "recovered as lost, or its task was cancelled)"
            )
        self.checkpoint_state = saved

    def batch_results(self, worker: str, *, page_size: int = 500) -> Iterator[BatchResult]:
        """The results of a batch's items, in item order, read ``page_size`` at a time (a
        batch of 100,000 items is never in memory at once). ``worker`` names the item step."""
        if self.store is None:
            raise RuntimeError("this step runs without a store (not in a worker)")
        after = -1
        while True:
            page = self.store.batch_results(self.task_uuid, worker, after=after, limit=page_size)
            yield from page
            if len(page) < page_size:
                return
            after = page[-1].index

    def time_remaining(self) -> float:
        """Return the seconds left before this attempt times out (never negative)."""
        return max(0.0, self.deadline_monotonic - time.monotonic())


class HandlerRegistry:
    """Handler names mapped to the functions registered in code."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        # Whether each handler is ``async def``, found once at registration, not per call.
        self._is_async: dict[str, bool] = {}
        self._lock = threading.Lock()

    def register(self, name: str, handler: Handler) -> None:
        """Register ``handler`` as ``name``; another function under a taken name is an error."""
        if not name or not isinstance(name, str):
            raise ValueError("a handler name must be a non-empty string")
        with self._lock:
            existing = self._handlers.get(name)
            if existing is not None and _qualname(existing) != _qualname(handler):
                raise ConfigurationError(
                    f"handler {name!r} is registered twice: "
                    f"{_qualname(existing)} and {_qualname(handler)}"
                )
            self._handlers[name] = handler
            self._is_async[name] = inspect.iscoroutinefunction(handler)

    def resolve(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def is_async(self, name: str) -> bool:
        return self._is_async.get(name, False)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._handlers.pop(name, None)
            self._is_async.pop(name, None)


registry = HandlerRegistry()


def step_handler(name: str, *, registry: HandlerRegistry = registry) -> Callable[[H], H]:
    """Register the decorated function (sync or ``async def``) as the handler ``name``."""

    def decorate(func: H) -> H:
        registry.register(name, func)
        return func

    return decorate


def import_handler_modules(modules: Iterable[str]) -> None:
    """Import the modules named in ``worker.handler_modules`` so their handlers register."""
    # Like other worker tools, look in the working directory first, so project modules
    # import without an install.
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigurationError(
                f"worker.handler_modules: cannot import {module!r}: {type(exc).__name__}: {exc}"
            ) from None


def bind_logger(
    *, task_uuid: str, step_uuid: str, step_name: str, attempt: int, worker_id: str
) -> Logger:
    """Return a logger that tags every line with the step (``observability.logs.STEP_FIELDS``)."""
    return logger.bind(
        task_uuid=task_uuid,
        step_uuid=step_uuid,
        step_name=step_name,
        attempt=attempt,
        worker_id=worker_id,
    )


def _qualname(func: Callable[..., Any]) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"
