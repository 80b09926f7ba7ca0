"""``duplex pause`` and ``duplex resume``: hold back the steps of a namespace or a template.

No step of a paused namespace, nor of a task made from a paused template, is claimed; steps
already running finish. Both commands are idempotent (``duplex.storage.pauses``) and exit 0
when there was nothing to do, saying so. ``duplex status`` lists the pauses in force.
"""

from __future__ import annotations

import argparse
from typing import Any

from duplex.cli.common import open_database
from duplex.clock import utcnow
from duplex.errors import InputError
from duplex.intake.wake import wake_local_workers
from duplex.settings import Settings
from duplex.storage.operations import operator_identity
from duplex.storage.pauses import (
    NAMESPACE,
    TEMPLATE,
    pause,
    pause_summary,
    resume,
    resume_summary,
)


def add_commands(sub: Any) -> None:
    """Add ``pause`` and ``resume``."""
    for name, help_text, func in (
        (
            "pause",
            "stop claiming a namespace's (or a template's) steps; running ones finish",
            cmd_pause,
        ),
        ("resume", "claim a paused namespace's (or template's) steps again", cmd_resume),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("namespace", nargs="?", metavar="NAMESPACE")
        command.add_argument(
            "--template", metavar="NAME", help=f"{name} the tasks made from this template instead"
        )
        if name == "pause":
            command.add_argument("--reason", metavar="TEXT", help="why (shown by `duplex status`)")
        command.set_defaults(func=func)


def cmd_pause(args: argparse.Namespace, settings: Settings) -> int:
    kind, name = _target(args)
    with open_database(settings) as db, db.write() as conn:
        paused, new = pause(
            conn,
            kind=kind,
            name=name,
            operator=operator_identity(),
            now=utcnow(),
            reason=args.reason,
        )
    print(pause_summary(paused, new))
    return 0


def cmd_resume(args: argparse.Namespace, settings: Settings) -> int:
    kind, name = _target(args)
    with open_database(settings) as db:
        with db.write() as conn:
            lifted, namespaces = resume(conn, kind=kind, name=name)
        if namespaces:  # SQLite: wake this host's workers (PostgreSQL was notified)
            claim_timeout_s = settings.event_system.claim_timeout_s
            wake_local_workers(db, claim_timeout_s=claim_timeout_s, namespaces=namespaces)
    print(resume_summary(kind, name, lifted))
    return 0


def _target(args: argparse.Namespace) -> tuple[str, str]:
    if (args.namespace is None) == (args.template is None):
        raise InputError("give a NAMESPACE or --template NAME, not both")
    return (NAMESPACE, args.namespace) if args.template is None else (TEMPLATE, args.template)
