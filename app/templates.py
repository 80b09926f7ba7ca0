"""Task templates: load TOML, validate it with pydantic, and order the steps.

Everything here runs before anything is written to a database, so a template
that reaches storage is already known to be a well-formed DAG of steps whose
inputs are plain JSON values. Every failure is a ``TemplateError`` whose
message is one line: the source (a file path or ``<template>``), then the
problem.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from duplex.commit.retry import StepRetryPolicy
from duplex.dag import topological_order
from duplex.durations import format_duration, parse_duration
from duplex.dynamic.kinds import (
    MAX_WAIT_TIMEOUT_MS,
    StepKind,
    shape_problems,
    step_problems,
)
from duplex.errors import TemplateError
from duplex.flow.concurrency import ConcurrencyLimit, concurrency_problems
from duplex.flow.rates import RateLimitUse, rate_problems
from duplex.schedules.declaration import ScheduleDeclaration

__all__ = [
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "EventDeclaration",
    "StepRetryPolicy",
    "StepTemplate",
    "TaskTemplate",
    "load_template",
    "parse_template",
]

# Strict scalars: a template is authored by hand, so `max_attempts = "3"` or
# `retryable = 1` is more likely a mistake than an intent worth coercing.
_NonEmptyStr = Annotated[str, Field(strict=True, min_length=1)]
_StepName = Annotated[str, Field(strict=True, min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
# A duration is read only as text with a unit (``15m``; a bare number has none) and written
# back the same way, so that a stored template (a schedule's) reads back.
Duration = Annotated[
    timedelta,
    BeforeValidator(lambda v: v if isinstance(v, timedelta) else parse_duration(v)),
    PlainSerializer(format_duration, return_type=str),
]
# Higher is claimed first (docs/time.md, Priority). Bounded, so that the aging bound is too.
PRIORITY_MIN, PRIORITY_MAX = -100, 100
Priority = Annotated[int, Field(strict=True, ge=PRIORITY_MIN, le=PRIORITY_MAX)]

# How many pydantic errors one message lists before summarising the rest.
_MAX_REPORTED_ERRORS = 10

# pydantic speaks Python; template authors speak TOML.
_TOML_WORDING = {
    "extra_forbidden": "unknown field",
    "tuple_type": "Input should be an array",
    "list_type": "Input should be an array",
    "dict_type": "Input should be a table",
    "model_type": "Input should be a table",
}


class EventDeclaration(BaseModel):
    """A domain event a step announces, and when it announces it, as a template declares it.

    Stored with the step; a claimed step carries it as ``duplex.messages.DeclaredEvent``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _NonEmptyStr
    condition: Literal["success", "failure", "always"] = "success"


class StepTemplate(BaseModel):
    """One step of a task template."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _StepName
    # What the step is (docs/workflows.md): a handler step by default; ``decision``,
    # ``batch``, ``wait`` and ``sleep`` shape the task while it runs (duplex.dynamic.kinds).
    kind: StepKind = "handler"
    # Every kind but ``wait`` and ``sleep`` runs a handler.
    handler: _NonEmptyStr | None = None
    depends_on: tuple[_StepName, ...] = ()
    max_attempts: Annotated[int, Field(strict=True, ge=1, le=100)] = 3
    retryable: Annotated[bool, Field(strict=True)] = True
    # A handler's at most a week (the attempt's deadline is on a timer that serves 30 days
    # ahead); a wait's at most a year (its timeout is only a time in its row).
    timeout_ms: Annotated[int, Field(strict=True, gt=0, le=MAX_WAIT_TIMEOUT_MS)] | None = None
    # A decision's possible branches (steps that depend on it).
    branches: tuple[_StepName, ...] = ()
    # A batch's item step: created once per item its handler returns.
    worker: _StepName | None = None
    # The signal a wait step waits for (``duplex signal TASK NAME``).
    signal: _StepName | None = None
    # How long a sleep step sleeps (``500ms``, ``2s``, ``15m``, ``1h``, ``1d``).
    duration: Duration | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    events: tuple[EventDeclaration, ...] = ()
    # None: the task's priority (the template's top-level ``priority``, or the submission's).
    priority: Priority | None = None
    retry: StepRetryPolicy | None = None
    # At most ``limit`` attempts with this key at once; each start takes tokens of the rate
    # limit (both on every worker together: docs/flow-control.md).
    concurrency: ConcurrencyLimit | None = None
    rate_limit: RateLimitUse | None = None

    @field_validator("inputs")
    @classmethod
    def _inputs_are_json(cls, inputs: dict[str, Any]) -> dict[str, Any]:
        """Reject TOML values that have no JSON form, before they reach a JSON column."""
        problem = _non_json_value(inputs, "inputs")
        if problem is not None:
            raise ValueError(problem)
        return inputs

    @model_validator(mode="after")
    def _kind_keys_fit(self) -> StepTemplate:
        """Reject keys that the step's kind does not use, and missing ones it needs."""
        problems = step_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _dependencies_are_distinct(self) -> StepTemplate:
        """Reject a step that depends on itself or lists a dependency twice."""
        if self.name in self.depends_on:
            raise ValueError(f"step {self.name!r} depends on itself")
        seen: set[str] = set()
        for dependency in self.depends_on:
            if dependency in seen:
                raise ValueError(
                    f"step {self.name!r} lists dependency {dependency!r} more than once"
                )
            seen.add(dependency)
        return self


class TaskTemplate(BaseModel):
    """A named, versioned DAG of steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _NonEmptyStr
    namespace: _NonEmptyStr = "default"
    version: _NonEmptyStr = "1.0.0"
    description: Annotated[str, Field(strict=True)] = ""
    # The priority of the steps that set none; a submission's ``priority`` replaces it.
    priority: Priority = 0
    # How long a task may take from its start (``500ms``, ``2s``, ``15m``, ``1h``,
    # ``1d``): then its waiting steps are cancelled and its running attempts told to stop
    # (docs/time.md, Task deadline).
    max_duration: Duration | None = None
    steps: tuple[StepTemplate, ...]
    # ``[[schedules]]``: fired from this template, synced when a worker starts (docs/time.md).
    schedules: tuple[ScheduleDeclaration, ...] = ()

    @field_validator("schedules")
    @classmethod
    def _schedule_names_are_distinct(
        cls, schedules: tuple[ScheduleDeclaration, ...]
    ) -> tuple[ScheduleDeclaration, ...]:
        names = [schedule.name for schedule in schedules]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"schedule name(s) declared twice: {', '.join(twice)}")
        return schedules

    @field_validator("steps")
    @classmethod
    def _has_steps(cls, steps: tuple[StepTemplate, ...]) -> tuple[StepTemplate, ...]:
        """Require at least one step."""
        # Not Field(min_length=1): pydantic checks that length against the items
        # that validated, so one bad step would also report "at least 1 item".
        if not steps:
            raise ValueError("a template needs at least one step")
        return steps

    @model_validator(mode="after")
    def _steps_form_a_dag(self) -> TaskTemplate:
        """Reject duplicate step names, unknown dependencies and cycles."""
        problems: list[str] = []
        index: dict[str, int] = {}
        for position, step in enumerate(self.steps):
            if step.name in index:
                problems.append(
                    f"duplicate step name {step.name!r} (steps.{index[step.name]} "
                    f"and steps.{position})"
                )
            else:
                index[step.name] = position
        for step in self.steps:
            problems.extend(
                f"step {step.name!r} depends on unknown step {dependency!r}"
                for dependency in step.depends_on
                if dependency not in index
            )
        if problems:
            raise ValueError("; ".join(problems))
        _, cycle = topological_order(self.steps, index)
        if cycle:
            raise ValueError("cycle: " + " -> ".join([*cycle, cycle[0]]))
        steps = self.steps
        problems = [*shape_problems(steps), *concurrency_problems(steps), *rate_problems(steps)]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def step_priority(self, step: StepTemplate, task_priority: int | None = None) -> int:
        """The priority ``step`` is claimed with: its own, else the submission's, else the
        template's top-level one."""
        if step.priority is not None:
            return step.priority
        return self.priority if task_priority is None else task_priority

    def topological_order(self) -> tuple[StepTemplate, ...]:
        """Return the steps parents first; among ready steps, template order wins."""
        index = {step.name: position for position, step in enumerate(self.steps)}
        order, _ = topological_order(self.steps, index)
        return tuple(self.steps[position] for position in order)


def parse_template(text: str, *, source: str = "<template>") -> TaskTemplate:
    """Parse TOML text; raise TemplateError with ONE line naming the source and the problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TemplateError(_one_line(f"{source}: invalid TOML: {exc}")) from exc
    return _validate(data, source)


def load_template(ref: str, templates_dir: Path | None = None) -> TaskTemplate:
    """Load a template from a file path, or by name from ``templates_dir``.

    A name is looked up as ``<templates_dir>/<ref>.toml``, then as any
    ``*.toml`` in ``templates_dir`` whose ``name`` field equals ``ref``.
    """
    path = Path(ref)
    if path.is_file():
        return _load_file(path)
    if _looks_like_path(ref) or templates_dir is None:
        reason = "is a directory" if path.is_dir() else "no such file"
        tried = f"{ref} ({reason})"
        if templates_dir is None and not _looks_like_path(ref):
            tried += "; no templates directory to look the name up in"
        raise TemplateError(_one_line(f"template not found: {tried}"))

    candidate = templates_dir / f"{ref}.toml"
    if candidate.is_file():
        return _load_file(candidate)
    return _load_by_name(ref, templates_dir, candidate)


def _load_by_name(name: str, templates_dir: Path, tried_file: Path) -> TaskTemplate:
    """Find the one ``*.toml`` in ``templates_dir`` whose ``name`` field is ``name``."""
    matches: list[tuple[Path, str]] = []
    unreadable: list[Path] = []
    # Sorted so the error message, and any ambiguity report, is reproducible.
    for path in sorted(templates_dir.glob("*.toml")) if templates_dir.is_dir() else []:
        if not path.is_file():
            continue
        try:
            text = _read_text(path)
            data = tomllib.loads(text)
        except (TemplateError, tomllib.TOMLDecodeError):
            # A broken neighbour must not block lookups of the others; it is
            # named in the not-found message in case it was the one meant.
            unreadable.append(path)
            continue
        if data.get("name") == name:
            matches.append((path, text))

    if len(matches) == 1:
        path, text = matches[0]
        return parse_template(text, source=str(path))
    if matches:
        names = ", ".join(str(path) for path, _ in matches)
        raise TemplateError(_one_line(f"template name {name!r} is ambiguous: {names}"))

    if not templates_dir.is_dir():
        where = f"templates directory {templates_dir} does not exist"
    else:
        where = f"no *.toml in {templates_dir} has name = {name!r}"
    message = f"template not found: {name!r} (tried {tried_file}; {where}"
    if unreadable:
        message += "; unreadable: " + ", ".join(str(path) for path in unreadable)
    raise TemplateError(_one_line(message + ")"))


def _load_file(path: Path) -> TaskTemplate:
    """Read and validate one template file."""
    return parse_template(_read_text(path), source=str(path))


def _read_text(path: Path) -> str:
    """Read a file as UTF-8, mapping OS and decoding failures to TemplateError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise TemplateError(_one_line(f"template not found: {path} (no such file)")) from exc
    except OSError as exc:
        raise TemplateError(_one_line(f"{path}: cannot read: {exc.strerror or exc}")) from exc
    try:
        # utf-8-sig: editors that write a BOM should not make a template invalid.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TemplateError(
            _one_line(f"{path}: not valid UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start}")
        ) from exc


def _validate(data: Mapping[str, Any], source: str) -> TaskTemplate:
    """Validate parsed TOML, mapping pydantic's errors to one TemplateError line."""
    try:
        return TaskTemplate.model_validate(data)
    except ValidationError as exc:
        detail = _describe_errors(exc.errors(), data)
        raise TemplateError(_one_line(f"{source}: invalid template: {detail}")) from exc


def _describe_errors(errors: Sequence[ErrorDetails], data: Mapping[str, Any] | None = None) -> str:
    """Render pydantic errors as ``location: message`` joined with ``; ``."""
    parts = []
    for error in errors[:_MAX_REPORTED_ERRORS]:
        location = _location(error["loc"], data)
        message = _TOML_WORDING.get(error["type"], error["msg"])
        if error["type"] == "value_error":
            # Our own validators' messages, without pydantic's "Value error, ".
            message = str(error.get("ctx", {}).get("error", message))
        parts.append(f"{location}: {message}" if location else message)
    if len(errors) > _MAX_REPORTED_ERRORS:
        parts.append(f"and {len(errors) - _MAX_REPORTED_ERRORS} more error(s)")
    return "; ".join(parts)


def _location(loc: Sequence[int | str], data: Mapping[str, Any] | None) -> str:
    """Render an error's location; within a step's ``retry`` table, name the step too
    (``steps.1 (charge).retry.jitter``): a policy is often copied from step to step."""
    location = ".".join(str(part) for part in loc)
    if len(loc) < 3 or loc[0] != "steps" or loc[2] != "retry" or not isinstance(loc[1], int):
        return location
    steps = (data or {}).get("steps")
    step = steps[loc[1]] if isinstance(steps, list) and loc[1] < len(steps) else None
    name = step.get("name") if isinstance(step, dict) else None
    if not isinstance(name, str):
        return location
    return ".".join(["steps", f"{loc[1]} ({name})", *(str(part) for part in loc[2:])])


def _one_line(message: str) -> str:
    """Escape line breaks so the CLI can always print the message as one line."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def _looks_like_path(ref: str) -> bool:
    """Tell a file reference from a template name."""
    return ref.endswith(".toml") or "/" in ref or "\\" in ref


def _non_json_value(value: Any, location: str) -> str | None:
    """Describe the first value under ``value`` that JSON cannot hold, if any."""
    # Iterative: a deeply nested inputs table must not hit the recursion limit.
    pending: list[tuple[Any, str]] = [(value, location)]
    while pending:
        item, where = pending.pop()
        if isinstance(item, datetime | date | time):
            return f"{where}: TOML date/time values are not allowed in inputs; use a string"
        if isinstance(item, float) and not math.isfinite(item):
            return f"{where}: {item} is not a JSON number"
        if isinstance(item, dict):
            pending.extend((child, f"{where}.{key}") for key, child in item.items())
        elif isinstance(item, list):
            pending.extend((child, f"{where}.{i}") for i, child in enumerate(item))
    return None
