"""How the intake learns of new work besides in-process nudges: polling, and a listener.

On PostgreSQL the listener is LISTEN/NOTIFY, as ``deployment_mode`` says. On SQLite it is the
local wake-up socket (``duplex.intake.wake``) in every mode, and the worker always polls too.
"""

from __future__ import annotations

from collections.abc import Callable

from loguru import logger

from duplex.intake.wake import WakeListener
from duplex.settings import Settings
from duplex.storage.db import Database
from duplex.storage.listen import NotifyWorkListener, WorkListener, listen_on

ListenForWork = Callable[[Callable[[], None]], WorkListener]


def intake_signals(
    settings: Settings, db: Database, worker_id: str
) -> tuple[bool, ListenForWork | None]:
    """Return whether to poll, and how to build the listener (if any) of worker ``worker_id``.

    PostgreSQL: ``polling`` polls, ``event_driven`` listens (with the intake's safety poll),
    ``hybrid`` does both. SQLite: every mode polls and takes local wake-ups. The wake-ups come
    from submissions and operator commands on this host, not from the commits of other workers
    on the same file, so on SQLite the poll is what finds the steps those make ready, and
    ``event_driven`` polls too (and says so).
    """
    mode = settings.event_system.deployment_mode
    namespaces = settings.worker.namespaces
    if db.is_sqlite:
        if mode == "event_driven":
            logger.warning(
                "event_system.deployment_mode = 'event_driven' needs PostgreSQL LISTEN/NOTIFY; "
                "on sqlite the worker polls, and submissions on this host wake it at once"
            )

        def wake_listener(on_work: Callable[[], None]) -> WorkListener:
            return WakeListener(db, worker_id, namespaces, on_work)

        return True, wake_listener
    if mode == "polling":
        return True, None

    def work_listener(url: str, on_work: Callable[[], None]) -> NotifyWorkListener:
        return NotifyWorkListener(url, namespaces, on_work)

    listen = listen_on(db, work_listener)
    if listen is None:
        logger.warning(
            "event_system.deployment_mode = {!r} needs PostgreSQL LISTEN/NOTIFY; {} polls instead",
            mode,
            db.dialect,
        )
        return True, None
    return mode == "hybrid", listen
