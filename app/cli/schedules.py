"""``duplex schedule add|list|show|pause|resume|remove|sync``: schedules from the shell.

Each command is one transaction through the ``Client``'s schedule methods
(``duplex.schedules.commands``); bad input is one line and writes nothing.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.table import Table

from duplex.cli import console
from duplex.cli.common import open_database
from duplex.cli.context import parse_context
from duplex.cli.output import print_json
from duplex.client import Client
from duplex.clock import utcnow
from duplex.schedules.declaration import DEFAULT_CATCHUP, OVERLAP_POLICIES
from duplex.schedules.spec import format_duration
from duplex.schedules.sync import sync_directory
from duplex.settings import Settings
from duplex.storage.schedules import Schedule, ScheduleFire
from duplex.templates import load_template


def add_commands(sub: Any) -> None:
    """Add ``schedule`` and its subcommands."""
    schedule = sub.add_parser("schedule", help="fire a template on a cron expression or interval")
    commands = schedule.add_subparsers(dest="schedule_command", required=True)

    add = commands.add_parser("add", help="add a schedule")
    add.add_argument("name", metavar="NAME")
    add.add_argument("template", metavar="TEMPLATE", help="template file, or a name")
    when = add.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR", help="cron expression, e.g. '30 2 * * *'")
    when.add_argument("--every", metavar="DURATION", help="interval: 500ms, 2s, 15m, 1h, 1d")
    add.add_argument("--context", metavar="JSON", help="context of every task it fires")
    add.add_argument(
        "--timezone", metavar="TZ", default="UTC", help="IANA zone cron is read in (default UTC)"
    )
    add.add_argument(
        "--overlap",
        choices=OVERLAP_POLICIES,
        default="skip",
        help="when the previous run is unfinished: skip (default), buffer_one, allow",
    )
    add.add_argument(
        "--catchup",
        metavar="DURATION",
        help="fires later than this are recorded as missed "
        f"(default {format_duration(DEFAULT_CATCHUP)})",
    )
    add.add_argument("--paused", action="store_true", help="add it paused")
    add.add_argument("--replace", action="store_true", help="update a schedule of that name")
    add.set_defaults(func=cmd_add)

    listing = commands.add_parser("list", help="every schedule with its next fire time")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=cmd_list)

    show = commands.add_parser("show", help="one schedule and its last fires")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=cmd_show)

    for name, help_text, func in (
        ("pause", "stop firing it until resumed", cmd_pause),
        ("resume", "fire it again, from its next fire time after now", cmd_resume),
        ("remove", "remove it and its fire history (its tasks stay)", cmd_remove),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("name", metavar="NAME")
        command.set_defaults(func=func)

    sync = commands.add_parser(
        "sync", help="sync the [[schedules]] of the templates in templates.directory"
    )
    sync.set_defaults(func=cmd_sync)


def cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    context = parse_context(args.context)
    template = load_template(args.template, settings.templates.directory)
    with open_database(settings) as db, Client(db) as client:
        schedule = client.add_schedule(
            args.name,
            template,
            cron=args.cron,
            every=args.every,
            context=context,
            timezone=args.timezone,
            overlap=args.overlap,
            catchup=args.catchup,
            paused=args.paused,
            replace=args.replace,
        )
    state = "paused" if schedule.paused else f"next fire {_when(schedule)}"
    print(
        f"schedule {schedule.name}: {schedule.spec.describe()} -> {schedule.template_name}; {state}"
    )
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    with open_database(settings) as db, Client(db) as client:
        schedules = client.schedules()
    if args.json:
        print_json([schedule.as_json() for schedule in schedules])
        return 0
    if not schedules:
        print("no schedules")
        return 0
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "TEMPLATE", "WHEN", "OVERLAP", "CATCH-UP", "NEXT FIRE", "LAST FIRE"):
        table.add_column(column, overflow="fold")
    for s in schedules:
        table.add_row(
            s.name,
            s.template_name,
            s.spec.describe(),
            s.overlap,
            format_duration(s.catchup),
            "paused" if s.paused else _when(s),
            _time(s.last_fire_at),
        )
    console.make_console().print(table)
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    with open_database(settings) as db, Client(db) as client:
        schedule = client.schedule(args.name)
        fires = client.schedule_fires(args.name, limit=20)
    if args.json:
        print_json({**schedule.as_json(), "fires": [fire.as_json() for fire in fires]})
        return 0
    print(f"schedule {schedule.name}: {schedule.spec.describe()} -> {schedule.template_name}")
    print(
        f"overlap {schedule.overlap}, catch-up {format_duration(schedule.catchup)}, "
        + ("paused" if schedule.paused else f"next fire {_when(schedule)}")
        + (f", declared in template {schedule.declared_in}" if schedule.declared_in else "")
    )
    if schedule.buffered_fire_at is not None:
        print(f"held back until the previous run ends: {_time(schedule.buffered_fire_at)}")
    print(f"context {json.dumps(schedule.context)}")
    console.make_console().print(_fires_table(fires) if fires else "no fires yet")
    return 0


def cmd_pause(args: argparse.Namespace, settings: Settings) -> int:
    with open_database(settings) as db, Client(db) as client:
        schedule = client.pause_schedule(args.name)
    print(f"schedule {schedule.name}: paused")
    return 0


def cmd_resume(args: argparse.Namespace, settings: Settings) -> int:
    with open_database(settings) as db, Client(db) as client:
        schedule = client.resume_schedule(args.name)
    print(f"schedule {schedule.name}: resumed; next fire {_when(schedule)}")
    return 0


def cmd_remove(args: argparse.Namespace, settings: Settings) -> int:
    with open_database(settings) as db, Client(db) as client:
        client.remove_schedule(args.name)
    print(f"schedule {args.name}: removed")
    return 0


def cmd_sync(args: argparse.Namespace, settings: Settings) -> int:
    with open_database(settings) as db:
        counts = sync_directory(db, settings.templates.directory)
    print(
        "schedules: {added} added, {updated} updated, {unchanged} unchanged, "
        "{removed} removed".format(**counts)
    )
    return 0


def _fires_table(fires: list[ScheduleFire]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("FIRE TIME", "OUTCOME", "TASK", "DETAIL"):
        table.add_column(column, overflow="fold")
    for fire in fires:
        outcome = fire.outcome if fire.fires == 1 else f"{fire.outcome} x{fire.fires}"
        table.add_row(_time(fire.fire_at), outcome, fire.task_uuid or "-", fire.detail or "")
    return table


def _when(schedule: Schedule) -> str:
    seconds = (schedule.next_fire_at - utcnow()).total_seconds()
    ahead = f"in {console.age(seconds)}" if seconds >= 0 else f"due {console.age(-seconds)} ago"
    return f"{_time(schedule.next_fire_at)} ({ahead})"


def _time(value: Any) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S") + " UTC"
