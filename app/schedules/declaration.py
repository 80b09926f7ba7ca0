"""What a user declares about a schedule, validated before anything is written.

The same model serves ``duplex schedule add``, ``Client.add_schedule`` and a template file's
``[[schedules]]`` tables, so all three accept and refuse the same things with the same words.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from duplex.errors import InputError
from duplex.schedules.spec import ScheduleSpec, parse_duration

OverlapPolicy = Literal["skip", "buffer_one", "allow"]
OVERLAP_POLICIES: tuple[str, ...] = ("skip", "buffer_one", "allow")
# Procrastinate drops periodic fires more than 10 minutes late; the same default here, so a
# restart or a deploy of a few minutes loses no fire, and an outage of a day does not
# replay a day of fires.
DEFAULT_CATCHUP = timedelta(minutes=10)
# The idempotency key ``schedule:NAME@<fire time>`` must fit tasks.idempotency_key (255).
_ScheduleName = Annotated[
    str, Field(strict=True, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")
]


class ScheduleDeclaration(BaseModel):
    """One schedule as declared: name, when, the task's context, and the policies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _ScheduleName
    cron: Annotated[str, Field(strict=True, min_length=1)] | None = None
    every: Annotated[str, Field(strict=True)] | None = None
    timezone: Annotated[str, Field(strict=True, min_length=1)] = "UTC"
    context: dict[str, Any] = Field(default_factory=dict)
    overlap: OverlapPolicy = "skip"
    catchup: Annotated[str, Field(strict=True)] | None = None
    paused: Annotated[bool, Field(strict=True)] = False

    @field_validator("every", "catchup")
    @classmethod
    def _is_duration(cls, value: str | None) -> str | None:
        if value is not None:
            _checked(lambda: parse_duration(value))
        return value

    @field_validator("context")
    @classmethod
    def _context_is_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(
                "context holds a value JSON cannot (a TOML date or time, NaN): use a string"
            ) from None
        return value

    @model_validator(mode="after")
    def _spec_is_valid(self) -> ScheduleDeclaration:
        _checked(lambda: self.spec)
        return self

    @property
    def spec(self) -> ScheduleSpec:
        every_ms = None
        if self.every is not None:
            every_ms = parse_duration(self.every) // timedelta(milliseconds=1)
        return ScheduleSpec(cron=self.cron, every_ms=every_ms, timezone=self.timezone)

    @property
    def catchup_window(self) -> timedelta:
        return DEFAULT_CATCHUP if self.catchup is None else parse_duration(self.catchup)


def declare(**values: Any) -> ScheduleDeclaration:
    """Validate a declaration given as keywords; one-line ``InputError`` when it is not one."""
    from pydantic import ValidationError

    try:
        return ScheduleDeclaration.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors()[:5]:
            where = ".".join(str(part) for part in error["loc"])
            message = str(error.get("ctx", {}).get("error", error["msg"]))
            problems.append(f"{where}: {message}" if where else message)
        raise InputError("invalid schedule: " + "; ".join(problems)) from None


def _checked(check: Any) -> None:
    """Run ``check``; turn its ``InputError`` into the ``ValueError`` pydantic reports."""
    try:
        check()
    except InputError as exc:
        raise ValueError(str(exc)) from None
