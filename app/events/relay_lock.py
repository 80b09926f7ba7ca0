"""On SQLite, one relay at a time publishes: an exclusive ``flock`` next to the database file.

SQLite has no row locks to keep two relays off one task's head (``duplex.storage.outbox``), so
the whole database gets one publisher; the others wait as standbys.
"""

from __future__ import annotations

import fcntl
import os
from typing import IO

from sqlalchemy.engine import make_url

from duplex.storage.db import Database


class RelayLock:
    """On SQLite, one relay at a time: an exclusive ``flock`` on ``<database>.relay-lock``.

    The kernel releases it when the holder dies (even by SIGKILL), so a standby takes over at
    its next try. Every other backend gets a lock that always succeeds (row locks serve).
    """

    def __init__(self, db: Database) -> None:
        self._path: str | None = None
        if db.is_sqlite:
            database = make_url(db.url).database
            if database and database != ":memory:":
                # The real path: relays that reach one file through different names (a
                # symlink, a relative path from another directory) must meet at one lock.
                self._path = os.path.realpath(database) + ".relay-lock"
        self._file: IO[bytes] | None = None

    @property
    def held(self) -> bool:
        return self._path is None or self._file is not None

    def try_acquire(self) -> bool:
        if self.held:
            return True
        assert self._path is not None
        handle = open(self._path, "ab")  # noqa: SIM115 - held open for as long as the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._file = handle
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None
