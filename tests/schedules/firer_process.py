"""A schedule firer in a process of its own, driven line by line over stdin by the tests.

    python -m tests.schedules.firer_process DATABASE_URL

Commands (one per line), each answered with one line on stdout:

* ``FIRE NOW_MS``: fire until nothing is due at T0 + NOW_MS; answer ``DONE ERRORS``, the
  non-transient failures met (transient ones are retried, as the worker's poller does).
* ``FIRE_AND_HANG NOW_MS MARKER``: fire once, and between writing the tasks and advancing
  the schedules create the file MARKER and sleep forever (the test kills the process there).
* ``QUIT``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from duplex.errors import StorageError
from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.schedule_firing import fire_due
from tests.schedules.support import T0


def fire_until_done(db: Database, now_ms: int) -> int:
    now = T0 + timedelta(milliseconds=now_ms)
    errors = 0
    for _ in range(200):
        try:
            with db.write() as conn:
                if not fire_due(conn, now=now, worker_id=f"pid-{os.getpid()}", limit=3).acted:
                    return errors
        except StorageError as exc:
            if not exc.transient:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                errors += 1
    return errors + 1


def _hang_at(marker: Path) -> Callable[[], None]:
    def hang() -> None:
        marker.write_text(str(os.getpid()))
        while True:
            time.sleep(3600)

    return hang


def main() -> None:
    db = Database(DatabaseSettings(url=sys.argv[1]))
    print("READY", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "FIRE":
            print(f"DONE {fire_until_done(db, int(args[0]))}", flush=True)
        elif command == "FIRE_AND_HANG":
            now = T0 + timedelta(milliseconds=int(args[0]))
            hang = _hang_at(Path(args[1]))
            with db.write() as conn:
                fire_due(conn, now=now, worker_id="doomed", after_tasks_written=hang)
        elif command == "QUIT":
            break
    db.dispose()


if __name__ == "__main__":
    main()
