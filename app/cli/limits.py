"""``duplex limits set|list``: the named rate limits, in SQL, changed while workers run.

``set`` creates a limit or changes its rate and burst at once for every worker (the bucket's
state is kept); ``list`` shows each limit with the tokens it has now. A step takes tokens with
``rate_limit = "NAME"`` (docs/flow-control.md).
"""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import TypeAdapter, ValidationError
from rich.table import Table

from duplex.cli import console
from duplex.cli.common import open_database
from duplex.cli.output import print_json
from duplex.clock import utcnow
from duplex.errors import InputError
from duplex.flow.rates import RATE_EXPECTED, LimitName, parse_rate
from duplex.settings import Settings
from duplex.storage.operations import operator_identity
from duplex.storage.rate_limits import list_limits, set_limit


def add_commands(sub: Any) -> None:
    """Add ``limits`` and its subcommands."""
    limits = sub.add_parser("limits", help="rate limits shared by every worker")
    commands = limits.add_subparsers(dest="limits_command", required=True)
    change = commands.add_parser("set", help="create a rate limit, or change it at once")
    change.add_argument("name", metavar="NAME")
    change.add_argument("rate", metavar="RATE", help=RATE_EXPECTED)
    change.add_argument(
        "--burst",
        type=int,
        default=0,
        metavar="N",
        help="units that may start at once above the rate (default 0)",
    )
    change.set_defaults(func=cmd_set)
    listing = commands.add_parser("list", help="the rate limits and their tokens now")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=cmd_list)


def cmd_set(args: argparse.Namespace, settings: Settings) -> int:
    if not _valid_name(args.name):
        raise InputError(f"invalid limit name {args.name!r}: letters, digits, '_', '.', '-'")
    try:
        rate = parse_rate(args.rate, args.burst)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    with open_database(settings) as db, db.write() as conn:
        before = set_limit(conn, args.name, rate, now=utcnow(), operator=operator_identity())
    was = "new" if before is None else f"was {before.text()}, burst {before.burst}"
    print(f"rate limit {args.name}: {rate.text()}, burst {rate.burst} ({was})")
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    with open_database(settings) as db, db.read() as conn:
        limits = list_limits(conn, now=utcnow())
    if args.json:
        print_json([limit.as_json() for limit in limits])
        return 0
    if not limits:
        print("no rate limits")
        return 0
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "RATE", "BURST", "TOKENS NOW", "UPDATED", "BY"):
        table.add_column(column, overflow="fold")
    for limit in limits:
        table.add_row(
            limit.name,
            limit.rate.text(),
            str(limit.rate.burst),
            f"{limit.tokens:.1f}",
            limit.updated_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
            limit.updated_by or "",
        )
    console.make_console().print(table)
    return 0


def _valid_name(name: str) -> bool:
    try:
        _NAME.validate_python(name)
    except ValidationError:
        return False
    return True


_NAME: TypeAdapter[str] = TypeAdapter(LimitName)
