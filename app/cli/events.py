"""The ``duplex`` commands about domain events: ``relay``, ``events`` and ``prune``.

* ``duplex relay [--until-idle]`` runs the outbox relay as a process of its own (whatever
  ``relay.enabled`` says: that setting is about the relay inside ``duplex run``).
* ``duplex events [--task UUID] [--follow] [--json]`` prints committed events in order;
  ``duplex events retry EVENT_ID`` / ``skip EVENT_ID`` settle a dead-lettered event.
* ``duplex prune --older-than DURATION [--dry-run]`` deletes finished tasks and published
  events, in small batches.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from loguru import logger

from duplex.cli.common import EXIT_INTERRUPTED, open_database, stop_signals_received
from duplex.cli.output import check_reader
from duplex.clock import utcnow
from duplex.errors import InputError
from duplex.events.wiring import build_relay, listen_for_events
from duplex.settings import Settings
from duplex.storage.db import Database
from duplex.storage.event_operations import (
    recent_events,
    retry_event,
    skip_event,
    task_events,
    task_exists,
)
from duplex.storage.listen import SequenceRange
from duplex.storage.operations import operator_identity
from duplex.storage.outbox import OutboxEvent, event_lag
from duplex.storage.retention import PruneCounts, count_prunable, prune_batch

# ``--follow`` without ``--task`` re-reads this much history on every poll, because a commit
# batch's timestamp is taken before its commit: an event may become visible a little after
# later-stamped ones. On PostgreSQL the ranges each NOTIFY announces are read exactly too.
FOLLOW_WINDOW = timedelta(seconds=10)


def add_commands(sub: Any) -> None:
    """Add ``relay``, ``events`` and ``prune`` to the ``duplex`` parser."""
    relay = sub.add_parser("relay", help="publish committed events to RabbitMQ (the outbox relay)")
    relay.add_argument(
        "--until-idle",
        action="store_true",
        help="exit once no event is due for publishing (for scripts and tests)",
    )
    relay.set_defaults(func=cmd_relay)

    events = sub.add_parser(
        "events",
        help="print committed events in order; `events retry|skip EVENT_ID` settles one",
        description=(
            "Print committed domain events in commit order within each task. "
            "`duplex events retry EVENT_ID` gives a dead-lettered event fresh attempts; "
            "`duplex events skip EVENT_ID` settles it without publishing."
        ),
    )
    events.add_argument("action", nargs="*", metavar="retry|skip EVENT_ID")
    events.add_argument("--task", metavar="UUID", help="only this task's events, by sequence")
    events.add_argument("--follow", action="store_true", help="keep printing new events")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.add_argument(
        "--limit", type=int, default=1000, help="newest events to print first (default 1000)"
    )
    events.add_argument("--reason", metavar="TEXT", help="why (kept with retry/skip)")
    events.set_defaults(func=cmd_events)

    prune = sub.add_parser("prune", help="delete finished tasks and published events")
    prune.add_argument(
        "--older-than",
        required=True,
        type=parse_duration,
        metavar="DURATION",
        help="e.g. 30d, 12h, 90m, 45s, 2w: finished (or published) before that long ago",
    )
    prune.add_argument("--dry-run", action="store_true", help="print what would be deleted")
    prune.add_argument(
        "--batch-size",
        type=int,
        default=50,
        help="tasks (or events x10) per transaction (default 50)",
    )
    prune.set_defaults(func=cmd_prune)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` (or a number of seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use e.g. 30d, 12h, 90m, 45s, 2w)"
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds > 100 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"duration too long: {text!r}")
    return timedelta(seconds=seconds)


# --- duplex relay --------------------------------------------------------------------------


def cmd_relay(args: argparse.Namespace, settings: Settings) -> int:
    cfg = settings.relay
    with open_database(settings) as db, stop_signals_received() as stop:
        relay = build_relay(db, cfg)
        wake = threading.Event()
        listen = listen_for_events(db)
        listener = None if listen is None else listen(lambda _ranges: wake.set())
        if listener is not None:
            listener.start()
        logger.info(
            "relay started: {} to exchange {!r}, batches of {}",
            db.dialect,
            cfg.exchange,
            cfg.batch_size,
        )
        try:
            while not stop.requested:
                delay = relay.pump()
                if args.until_idle and delay > 0 and relay.connected and not _due(db):
                    logger.info("nothing left to publish; stopping (--until-idle)")
                    break
                if delay > 0:
                    stop.wait(delay, wake)
                    wake.clear()
        finally:
            if listener is not None:
                listener.stop()
            relay.close()
    logger.info("relay stopped: {} event(s) published", relay.stats.published)
    return 0


def _due(db: Database) -> bool:
    """Whether any event could be published now (unpublished and not dead-lettered)."""
    with db.read() as conn:
        lag = event_lag(conn, now=utcnow())
    return lag.unpublished > lag.dead_lettered


# --- duplex events -------------------------------------------------------------------------


def cmd_events(args: argparse.Namespace, settings: Settings) -> int:
    with open_database(settings) as db:
        if args.action:
            return _settle(db, args.action, args.reason)
        if args.limit < 1:
            raise InputError("--limit must be at least 1")
        if args.task:
            with db.read() as conn:
                if not task_exists(conn, args.task):
                    raise InputError(f"no task with uuid {args.task}")
        return _print_events(db, args)


def _settle(db: Database, action: list[str], reason: str | None) -> int:
    if len(action) != 2 or action[0] not in ("retry", "skip"):
        raise InputError(
            f"unknown events command: {' '.join(action)!r} "
            "(use `duplex events retry EVENT_ID` or `duplex events skip EVENT_ID`)"
        )
    verb, event_id = action
    operation = retry_event if verb == "retry" else skip_event
    with db.write() as conn:
        event = operation(conn, event_id, operator=operator_identity(), now=utcnow(), reason=reason)
    done = "will be published again" if verb == "retry" else "skipped; it will not be published"
    print(
        f"event {event.event_id} ({event.name}, task {event.task_uuid}, "
        f"sequence {event.sequence}) {done}"
    )
    return 0


def _print_events(db: Database, args: argparse.Namespace) -> int:
    last_sequence = 0
    seen: dict[str, datetime] = {}
    with db.read() as conn:
        if args.task:
            first = task_events(conn, args.task, limit=1_000_000)[-args.limit :]
        else:
            first = recent_events(conn, since=None, limit=args.limit)
    for event in first:
        _show(event, args.json)
        last_sequence = event.sequence
        seen[event.event_id] = event.created_at
    if not args.follow:
        return 0
    wake = threading.Event()
    ranges: list[SequenceRange] = []

    def on_events(new: list[SequenceRange]) -> None:
        ranges.extend(new)
        wake.set()

    listen = listen_for_events(db)
    listener = None if listen is None else listen(on_events)
    if listener is not None:
        listener.start()
    try:
        with stop_signals_received() as stop:
            while not stop.wait(0.25, wake):
                wake.clear()
                check_reader()  # as `tail -f`: stop once nobody reads, not at the next event
                with db.read() as conn:
                    if args.task:
                        new = task_events(conn, args.task, after_sequence=last_sequence)
                    else:
                        # The announced ranges first (exact), then the window (the rest).
                        announced, ranges[:] = list(ranges), []
                        new = [
                            event
                            for r in announced
                            for event in task_events(
                                conn,
                                r.task_uuid,
                                after_sequence=r.first - 1,
                                limit=r.last - r.first + 1,
                            )
                        ]
                        newest = max(seen.values(), default=utcnow())
                        new += recent_events(conn, since=newest - FOLLOW_WINDOW, limit=1_000_000)
                for event in new:
                    if args.task:
                        last_sequence = event.sequence
                    elif event.event_id in seen:
                        continue
                    seen[event.event_id] = event.created_at
                    _show(event, args.json)
                if not args.task and seen:
                    horizon = max(seen.values()) - 2 * FOLLOW_WINDOW
                    for event_id in [k for k, v in seen.items() if v < horizon]:
                        del seen[event_id]
            return EXIT_INTERRUPTED
    finally:
        if listener is not None:
            listener.stop()


def _show(event: OutboxEvent, as_json: bool) -> None:
    if as_json:
        line = json.dumps(event.as_json(), default=str)
    else:
        stamp = event.created_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        payload = json.dumps(event.payload, default=str, separators=(",", ":"))
        state = "" if event.state == "published" else f"  [{event.state}]"
        line = f"{stamp}  {event.task_uuid}  #{event.sequence:<4} {event.name}  {payload}{state}"
    print(line, flush=True)


# --- duplex prune --------------------------------------------------------------------------


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    cutoff = utcnow() - args.older_than
    with open_database(settings) as db:
        if args.dry_run:
            with db.read() as conn:
                counts = count_prunable(conn, cutoff=cutoff)
            when = f"{cutoff:%Y-%m-%d %H:%M:%S} UTC"
            print(f"would delete {_describe(counts)} (finished or published before {when})")
            return 0
        total = PruneCounts()
        while True:
            # One short transaction per batch: SQLite's writer lock is never held for long.
            with db.write() as conn:
                counts = prune_batch(conn, cutoff=cutoff, limit=args.batch_size)
            if counts.empty:
                break
            total.add(counts)
            time.sleep(0)  # let other writers of this process in between batches
    print(f"deleted {_describe(total)}")
    return 0


def _describe(counts: PruneCounts) -> str:
    return f"{counts.tasks} task(s) with {counts.steps} step(s), {counts.events} event(s)"
