"""Schedules declared in template files (``[[schedules]]``) deploy with the code.

A worker syncs them when it starts: every ``*.toml`` of ``templates.directory`` that
declares schedules has them added or brought up to date, and those a template declared
before and no longer declares are removed. A file that does not load is logged and left
alone, so one broken template never stops a worker. ``duplex schedule sync`` runs the same.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from duplex.clock import utcnow
from duplex.errors import DuplexError
from duplex.storage.db import Database
from duplex.storage.schedules import declared_names, sync_declared
from duplex.templates import TaskTemplate, load_template


def declaring_templates(directory: Path) -> list[TaskTemplate]:
    """The templates of ``directory`` that load (a broken one is logged and skipped)."""
    found: list[TaskTemplate] = []
    for path in sorted(directory.glob("*.toml")) if directory.is_dir() else []:
        try:
            found.append(load_template(str(path)))
        except DuplexError as exc:
            logger.warning("schedules: template {} not synced: {}", path, exc)
    return found


def sync_directory(db: Database, directory: Path) -> dict[str, int]:
    """Sync the schedules declared by the templates of ``directory``; return the counts."""
    totals = {"added": 0, "updated": 0, "unchanged": 0, "removed": 0}
    for template in declaring_templates(directory):
        with db.read() as conn:
            had = declared_names(conn, template.name)
        if not template.schedules and not had:
            continue
        with db.write() as conn:
            counts = sync_declared(conn, template, now=utcnow())
        for key, value in counts.items():
            totals[key] += value
    if any(totals[key] for key in ("added", "updated", "removed")):
        logger.info(
            "schedules from {}: {added} added, {updated} updated, {removed} removed",
            directory,
            **totals,
        )
    return totals
