"""The dashboard's operator actions: what each POST form does once it passed the guards.

The routes of ``duplex.dashboard.server`` check the login and the CSRF token (``_guarded``)
before any of these run. Each action runs the CLI's own storage function in one write
transaction, records ``operator:<name> (dashboard)``, wakes this host's workers when it made
work ready (SQLite; PostgreSQL was notified at the commit), and redirects back with the
report's one-line summary as the flash. Refusals are ``InputError``/``TransitionError`` (or
``HttpError``), which the server turns into its one-line error page, nothing written.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from typing import Any

from duplex.clock import utcnow
from duplex.dashboard.security import operator_name
from duplex.dashboard.web import HttpError, Request, Response, cookie_header, redirect, safe_next
from duplex.dynamic.kinds import WAIT
from duplex.errors import InputError
from duplex.intake.wake import wake_local_workers
from duplex.settings import Settings
from duplex.storage.dashboard_detail import step_detail
from duplex.storage.db import Database
from duplex.storage.operations import OperatorReport, complete_step
from duplex.storage.pauses import pause, pause_summary, resume, resume_summary
from duplex.storage.signals import send_signal

MAX_REASON = 1000


def operator_of(request: Request) -> str:
    """Who is acting, as recorded: the logged-in operator, else the name typed in the form."""
    try:
        name = request.operator or operator_name(request.form.get("operator"))
    except ValueError as exc:
        raise HttpError("400 Bad Request", str(exc)) from None
    return f"operator:{name} (dashboard)"


def reason_of(request: Request) -> str | None:
    reason = request.form.get("reason", "")
    if len(reason) > MAX_REASON:
        raise HttpError("400 Bad Request", f"reason: longer than {MAX_REASON} characters")
    return reason or None


def json_field(request: Request, key: str, *, obj: bool) -> Any:
    """The JSON value typed in the form field ``key`` (an object when ``obj``); one
    ``InputError`` naming the field otherwise."""
    text = request.form.get(key, "").strip()
    if not text:
        example = '{"ok": true}' if obj else '{"ok": true}, 42 or "yes"'
        raise InputError(f"{key}: give a JSON {'object' if obj else 'value'}, e.g. {example}")
    try:
        value = json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{key}: not JSON ({exc})") from None
    if obj and not isinstance(value, dict):
        raise InputError(
            f'{key}: a JSON object is needed (e.g. {{"ok": true}}), not {type(value).__name__}'
        )
    return value


def _not_json(name: str) -> None:
    # Python's json accepts NaN and Infinity; JSON (and PostgreSQL) do not.
    raise ValueError(f"{name} is not a JSON value")


def done(back: str, summary: str) -> Response:
    """Back to ``back``, which shows ``summary`` once (the flash cookie)."""
    flash = urllib.parse.quote(summary)
    return redirect(back, [("Set-Cookie", cookie_header("duplex_flash", flash, max_age=60))])


def operate(
    db: Database,
    settings: Settings,
    request: Request,
    operation: Callable[..., OperatorReport],
    target: str,
    kind: str,
) -> Response:
    """Cancel, retry, resolve or complete (``operation``, a function of
    ``duplex.storage.operations``) the task or step ``target``."""
    operator, reason = operator_of(request), reason_of(request)
    with db.write() as conn:
        report = operation(conn, target, operator=operator, now=utcnow(), reason=reason)
    if report.made_ready:  # this host's workers on SQLite look at once
        wake_local_workers(db, claim_timeout_s=settings.event_system.claim_timeout_s)
    if kind == "task":
        return done(f"/tasks/{report.task_uuid}", report.summary)
    return done(f"/steps/{report.changes[0].step_uuid}", report.summary)


def complete(db: Database, settings: Settings, request: Request, step_uuid: str) -> Response:
    """Complete a step by hand with the result typed in the form (``duplex complete``)."""
    result = json_field(request, "result", obj=True)

    def with_result(conn: Any, target: str, **kw: Any) -> OperatorReport:
        return complete_step(conn, target, result, **kw)

    return operate(db, settings, request, with_result, step_uuid, "step")


def signal(db: Database, settings: Settings, request: Request, step_uuid: str) -> Response:
    """Send a waiting wait step's signal (its own name) to its task (``duplex signal``), with
    the payload and the optional signal id typed in the form."""
    operator = operator_of(request)
    payload = json_field(request, "payload", obj=False)
    signal_id = request.form.get("signal_id", "").strip() or None
    with db.write() as conn:
        step = step_detail(conn, step_uuid)
        name = (step.spec or {}).get("signal") if step.kind == WAIT else None
        if not name:
            raise InputError(f"step {step.name} is not a wait step: it takes no signal")
        report = send_signal(
            conn, step.task_uuid, name, payload, signal_id=signal_id, sent_by=operator, now=utcnow()
        )
    if report.namespaces:  # SQLite; PostgreSQL was notified at the commit
        wake_local_workers(
            db,
            claim_timeout_s=settings.event_system.claim_timeout_s,
            namespaces=report.namespaces,
        )
    return done(f"/tasks/{step.task_uuid}", report.summary)


def pause_work(db: Database, settings: Settings, request: Request) -> Response:
    """Pause the namespace or template named in the form (``duplex pause``); a pause in force
    stays as it was, and the line says so."""
    kind, name = request.form.get("kind", ""), request.form.get("name", "")
    operator, reason = operator_of(request), reason_of(request)
    with db.write() as conn:
        paused, new = pause(
            conn, kind=kind, name=name, operator=operator, now=utcnow(), reason=reason
        )
    return done(safe_next(request.form), pause_summary(paused, new))


def resume_work(db: Database, settings: Settings, request: Request) -> Response:
    """Lift the pause of the namespace or template named in the form (``duplex resume``), then
    wake this host's workers for its namespaces as the CLI does (SQLite; PostgreSQL was
    notified at the commit). Nothing records who resumed, so no operator name is asked."""
    kind, name = request.form.get("kind", ""), request.form.get("name", "")
    with db.write() as conn:
        lifted, namespaces = resume(conn, kind=kind, name=name)
    if namespaces:
        wake_local_workers(
            db, claim_timeout_s=settings.event_system.claim_timeout_s, namespaces=namespaces
        )
    return done(safe_next(request.form), resume_summary(kind, name, lifted))
