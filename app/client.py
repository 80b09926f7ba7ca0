"""Submitting work from other programs, without running a worker.

    from duplex import Client

    with Client("postgresql+psycopg://app@db/duplex") as client:
        task_uuid = client.submit("order_fulfillment", {"order": order}, idempotency_key=order_id)
        uuids = client.submit_many("nightly_report", [{"day": d} for d in days])

A submission is one transaction. On PostgreSQL the steps it makes ready wake idle workers at
once through the work notification. On SQLite the client then sends a wake-up datagram to each
live worker on this host (``duplex.intake.wake``), reading their addresses at most once a
second; other workers see the steps at their next poll.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy.exc import IntegrityError

from duplex.clock import utcnow
from duplex.durations import MAX_DURATION
from duplex.errors import InputError, StorageError
from duplex.intake.start import checked_priority, start_time
from duplex.intake.wake import Waker
from duplex.messages import JSONDict
from duplex.observability.tracing import checked_carrier, current_carrier
from duplex.schedules.commands import ScheduleCommands
from duplex.settings import DatabaseSettings, EventSystemSettings, Settings
from duplex.storage.cancels import cancel_step
from duplex.storage.db import Database
from duplex.storage.operations import OperatorReport, cancel_task, operator_identity
from duplex.storage.pauses import NAMESPACE, TEMPLATE, Pause, list_pauses, pause, resume
from duplex.storage.schema import ensure_schema_ready
from duplex.storage.signals import SignalReport, send_signal
from duplex.storage.submission import create_tasks, existing_tasks
from duplex.templates import TaskTemplate, load_template


class Client(ScheduleCommands):
    """A connection to a Duplex database for creating tasks (and managing schedules:
    ``add_schedule``, ``pause_schedule``, ... in ``duplex.schedules.commands``)."""

    def __init__(self, target: str | Settings | Database) -> None:
        """``target``: a database URL, the settings (``database`` and ``templates`` are
        used), or an open ``Database`` (which the client then does not close)."""
        self._templates_dir: Path | None = None
        self._owns_db = not isinstance(target, Database)
        # Which workers count as alive, for the wake-ups (docs/architecture.md, Liveness).
        claim_timeout_s = EventSystemSettings().claim_timeout_s
        if isinstance(target, Database):
            self.db = target
        elif isinstance(target, Settings):
            self.db = Database(target.database)
            self._templates_dir = target.templates.directory
            claim_timeout_s = target.event_system.claim_timeout_s
        else:
            self.db = Database(DatabaseSettings(url=target))
        ensure_schema_ready(self.db)
        self._waker = Waker(self.db, claim_timeout_s=claim_timeout_s)

    def submit(
        self,
        template: TaskTemplate | str | Path,
        context: JSONDict | None = None,
        *,
        idempotency_key: str | None = None,
        trace_context: dict[str, str] | None = None,
        run_at: datetime | None = None,
        delay: timedelta | None = None,
        priority: int | None = None,
        max_duration: timedelta | None = None,
    ) -> str:
        """Create one task; return its UUID (an existing task's, for a key already used).

        ``trace_context`` is a W3C carrier (``{"traceparent": ...}``) that every step of the
        task continues; without it, the caller's current OpenTelemetry context (if any).
        ``run_at`` (an aware datetime) or ``delay``: the task's first steps are not claimed
        before then (docs/time.md). ``priority`` (-100..100, higher first) replaces the
        template's top-level ``priority`` for this task. ``max_duration`` (else the template's)
        is the task's deadline from now: then its waiting steps are cancelled and its running
        attempts told to stop (docs/time.md).
        """
        keys = None if idempotency_key is None else [idempotency_key]
        (task_uuid,) = self.submit_many(
            template,
            [context or {}],
            idempotency_keys=keys,
            trace_context=trace_context,
            run_at=run_at,
            delay=delay,
            priority=priority,
            max_duration=max_duration,
        )
        return task_uuid

    def submit_many(
        self,
        template: TaskTemplate | str | Path,
        contexts: Iterable[JSONDict],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
        trace_context: dict[str, str] | None = None,
        run_at: datetime | None = None,
        delay: timedelta | None = None,
        priority: int | None = None,
        max_duration: timedelta | None = None,
    ) -> list[str]:
        """Create one task per context in one transaction; return their UUIDs in order.

        ``run_at``, ``delay``, ``priority`` and ``max_duration`` apply to every task, as in
        ``submit``.
        """
        start_time(run_at, delay, now=utcnow())  # refuse bad input before any other work
        priority = checked_priority(priority)
        _check_max_duration(max_duration)
        trace_context = checked_carrier(trace_context) or current_carrier()
        resolved = self._template(template)
        batch = list(contexts)
        for context in batch:
            if not isinstance(context, dict):
                raise InputError(f"a task context must be a JSON object, not {context!r:.80}")
        if idempotency_keys is not None and len(idempotency_keys) != len(batch):
            raise InputError(
                f"{len(idempotency_keys)} idempotency key(s) for {len(batch)} context(s)"
            )
        for attempt in (1, 2):
            try:
                with self.db.write() as conn:
                    now = utcnow()
                    task_uuids = create_tasks(
                        conn,
                        resolved,
                        batch,
                        now=now,
                        idempotency_keys=idempotency_keys,
                        trace_context=trace_context,
                        run_at=start_time(run_at, delay, now=now),
                        priority=priority,
                        max_duration=max_duration,
                    )
                break
            except StorageError as exc:
                # Another submitter used one of the keys between our check and our insert:
                # the second try finds its task and writes nothing for that key.
                if attempt == 2 or not isinstance(exc.__cause__, IntegrityError):
                    raise
        else:
            raise AssertionError("unreachable")
        self._waker.wake([resolved.namespace])  # after the commit: never raises, never waits
        return task_uuids

    def find(self, template_name: str, idempotency_key: str) -> str | None:
        """Return the UUID of the task submitted with this key for this template, if any."""
        with self.db.read() as conn:
            return existing_tasks(conn, template_name, [idempotency_key]).get(idempotency_key)

    def signal(
        self,
        task_uuid: str,
        name: str,
        payload: Any = None,
        signal_id: str | None = None,
    ) -> SignalReport:
        """Send the signal ``name`` to a task: its wait step (``kind = "wait"``, ``signal =
        NAME``) completes with ``payload`` as its result (a dict is the result; any other JSON
        value is stored as ``{"payload": value}``) and its dependents go on, in one
        transaction. Sent before the wait started, it is kept and used when it starts.

        ``signal_id`` (default: a new one) makes a retry safe: the same id again changes
        nothing and reports ``outcome == "duplicate"``. A signal for a wait that already
        finished, a name the task does not wait for, a cancelled task, or a second signal for
        a wait not yet started raise ``TransitionError`` or ``InputError``, nothing written
        (docs/workflows.md). The report's ``summary`` is one line saying what happened.
        """
        with self.db.write() as conn:
            report = send_signal(
                conn,
                task_uuid,
                name,
                payload,
                signal_id=signal_id,
                sent_by=operator_identity(),
                now=utcnow(),
            )
        if report.namespaces:  # SQLite; PostgreSQL was notified at the commit
            self._waker.wake(report.namespaces)
        return report

    def cancel(
        self, task_uuid: str | None = None, *, step: str | None = None, reason: str | None = None
    ) -> OperatorReport:
        """Cancel a task, or (``step=``) one step of it, as ``duplex cancel`` does: what has
        not started is cancelled now, running attempts are stopped by their workers at their
        next sweep (``report.still_running`` says how many were asked). Raises
        ``TransitionError`` (finished, already cancelled) or ``InputError``, nothing written."""
        if (task_uuid is None) == (step is None):
            raise InputError("give either a task uuid or step=")
        operation, target = (cancel_task, task_uuid) if step is None else (cancel_step, step)
        assert target is not None
        with self.db.write() as conn:
            return operation(
                conn, target, operator=operator_identity(), now=utcnow(), reason=reason
            )

    def pause(
        self,
        namespace: str | None = None,
        *,
        template: str | None = None,
        reason: str | None = None,
    ) -> Pause:
        """Stop claiming the steps of ``namespace``, or of the tasks made from ``template``
        (give one); running steps finish. Return the pause in force (an earlier one stays)."""
        kind, name = _pause_target(namespace, template)
        with self.db.write() as conn:
            paused, _ = pause(
                conn,
                kind=kind,
                name=name,
                operator=operator_identity(),
                now=utcnow(),
                reason=reason,
            )
        return paused

    def resume(self, namespace: str | None = None, *, template: str | None = None) -> bool:
        """Lift the pause of ``namespace`` or ``template``; return whether one was lifted."""
        kind, name = _pause_target(namespace, template)
        with self.db.write() as conn:
            lifted, namespaces = resume(conn, kind=kind, name=name)
        self._waker.wake(namespaces)  # SQLite; PostgreSQL was notified at the commit
        return lifted is not None

    def pauses(self) -> list[Pause]:
        """The pauses in force, oldest first."""
        with self.db.read() as conn:
            return list_pauses(conn)

    def close(self) -> None:
        self._waker.close()
        if self._owns_db:
            self.db.dispose()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _template(self, template: TaskTemplate | str | Path) -> TaskTemplate:
        if isinstance(template, TaskTemplate):
            return template
        return load_template(str(template), self._templates_dir)


def _check_max_duration(max_duration: timedelta | None) -> None:
    """Refuse a deadline that is not a positive ``timedelta`` of at most ``MAX_DURATION``."""
    if max_duration is None:
        return
    if not isinstance(max_duration, timedelta):
        raise InputError(f"max_duration must be a timedelta, not {max_duration!r:.80}")
    if max_duration <= timedelta(0) or max_duration > MAX_DURATION:
        raise InputError(
            f"max_duration must be longer than zero and at most {MAX_DURATION.days} days, "
            f"not {max_duration}"
        )


def _pause_target(namespace: str | None, template: str | None) -> tuple[str, str]:
    if (namespace is None) == (template is None):
        raise InputError("give a namespace or a template to pause or resume, not both")
    return (NAMESPACE, namespace) if namespace is not None else (TEMPLATE, str(template))
