"""How the intake learns of new work: polling, LISTEN/NOTIFY, or both (``deployment_mode``)."""

from __future__ import annotations

from collections.abc import Callable

from loguru import logger

from duplex.settings import Settings
from duplex.storage.db import Database
from duplex.storage.listen import WorkListener, listen_on

ListenForWork = Callable[[Callable[[], None]], WorkListener]


def intake_signals(settings: Settings, db: Database) -> tuple[bool, ListenForWork | None]:
    """Return whether to poll, and how to build the LISTEN/NOTIFY listener (if any).

    LISTEN/NOTIFY needs PostgreSQL: on another database every mode polls (and says so).
    """
    mode = settings.event_system.deployment_mode
    if mode == "polling":
        return True, None
    namespaces = settings.worker.namespaces

    def work_listener(url: str, on_work: Callable[[], None]) -> WorkListener:
        return WorkListener(url, namespaces, on_work)

    listen = listen_on(db, work_listener)
    if listen is None:
        logger.warning(
            "event_system.deployment_mode = {!r} needs PostgreSQL LISTEN/NOTIFY; {} polls instead",
            mode,
            db.dialect,
        )
        return True, None
    return mode == "hybrid", listen
