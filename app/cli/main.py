"""The ``duplex`` command line: its parser and its entry point.

Each group of commands lives in a module of its own, which adds its commands to the parser:
``run`` (``duplex.cli.run``); ``submit``, ``status``, ``cancel``, ``retry``, ``resolve``,
``complete``, ``signal`` and ``workers`` (``duplex.cli.tasks``); ``schedule``
(``duplex.cli.schedules``); ``pause`` and ``resume`` (``duplex.cli.pauses``); ``limits``
(``duplex.cli.limits``); ``relay``,
``events`` and ``prune`` (``duplex.cli.events``); ``dashboard``; ``migrate``. Any
``DuplexError`` becomes one line on stderr and a non-zero exit, never a traceback
(``duplex.cli.common``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from duplex.cli import dashboard, events, limits, migrate, pauses, run, schedules, tasks
from duplex.cli.common import EXIT_USAGE, run_command
from duplex.observability.logs import configure_logging
from duplex.settings import Settings, load_settings

if TYPE_CHECKING:
    from _typeshed import SupportsWrite


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"duplex: error: {message} (see `duplex --help`)\n")

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        # argparse swallows a failed write, which would hide a closed pipe on stdout
        # (`duplex --help | head -1`) from main(); stderr keeps argparse's way.
        if message and file is sys.stdout:
            file.write(message)
        else:
            super()._print_message(message, file)


_SETTINGS_HELP = "settings file (default: $DUPLEX_SETTINGS or ./settings.toml)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="duplex", description="Duplex: a bounded-parallel step worker.")
    parser.add_argument("--settings", metavar="FILE", help=_SETTINGS_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # In the order `duplex --help` lists them.
    for group in (run, tasks, pauses, limits, schedules, events, dashboard, migrate):
        group.add_commands(sub)
    for command in sub.choices.values():
        # Also after the command (`duplex migrate --settings pg.toml`). SUPPRESS: when it is
        # not given there, the value given before the command stands.
        command.add_argument(
            "--settings", metavar="FILE", default=argparse.SUPPRESS, help=_SETTINGS_HELP
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``duplex`` console script: run one command line, return its exit
    code."""
    return run_command(lambda: _dispatch(argv))


def _dispatch(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    settings = load_settings(args.settings)
    configure_logging(settings.logging)
    return func(args, settings)
