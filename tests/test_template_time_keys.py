"""Template keys of issue 21 owned here: a step's ``[steps.retry]`` and the task's
``max_duration``. Each mistake is one line naming the template (its source), the step and the
key."""

from __future__ import annotations

from datetime import timedelta

import pytest

from duplex.errors import TemplateError
from duplex.templates import StepRetryPolicy, parse_template


def with_retry(lines: str) -> str:
    return (
        'name = "t"\n[[steps]]\nname = "first"\nhandler = "h.run"\n'
        '[[steps]]\nname = "charge"\nhandler = "h.run"\ndepends_on = ["first"]\n'
        f"[steps.retry]\n{lines}\n"
    )


def rejection(text: str) -> str:
    with pytest.raises(TemplateError) as info:
        parse_template(text, source="orders.toml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("orders.toml: invalid template: ")
    return message


def test_a_full_retry_table_is_read_and_stored_as_set() -> None:
    template = parse_template(
        with_retry(
            'strategy = "linear"\nbase_ms = 250\nmultiplier = 2\nmax_ms = 5000\njitter = 0.2'
        )
    )
    retry = template.steps[1].retry
    assert retry == StepRetryPolicy(
        strategy="linear", base_ms=250, multiplier=2.0, max_ms=5000, jitter=0.2
    )
    assert template.steps[0].retry is None
    assert parse_template(with_retry('strategy = "fixed"')).steps[1].retry.stored() == {  # type: ignore[union-attr]
        "strategy": "fixed"
    }
    assert StepRetryPolicy().stored() is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("backoff = 3", "steps.1 (charge).retry.backoff: unknown field"),
        ('strategy = "random"', "steps.1 (charge).retry.strategy: Input should be 'exponential'"),
        ('base_ms = "200"', "steps.1 (charge).retry.base_ms: Input should be a valid integer"),
        ("base_ms = 2.5", "steps.1 (charge).retry.base_ms: Input should be a valid integer"),
        ("base_ms = -1", "steps.1 (charge).retry.base_ms: Input should be greater than or equal"),
        ("max_ms = -5", "steps.1 (charge).retry.max_ms: Input should be greater than or equal"),
        ("multiplier = -2.0", "steps.1 (charge).retry.multiplier: Input should be greater than"),
        ('multiplier = "2"', "steps.1 (charge).retry.multiplier: Input should be a number"),
        ("multiplier = nan", "steps.1 (charge).retry.multiplier: Input should be a finite number"),
        ("jitter = 1.5", "steps.1 (charge).retry.jitter: Input should be less than or equal to 1"),
        ("jitter = -0.1", "steps.1 (charge).retry.jitter: Input should be greater than or equal"),
        ("jitter = true", "steps.1 (charge).retry.jitter: Input should be a number"),
    ],
)
def test_each_bad_retry_key_is_one_error_naming_step_and_key(line: str, expected: str) -> None:
    message = rejection(with_retry(line))
    assert expected in message
    assert message.count(";") == 0  # one problem, one error


def test_a_retry_that_is_not_a_table_is_refused() -> None:
    text = 'name = "t"\n[[steps]]\nname = "a"\nhandler = "h"\nretry = 3\n'
    assert "steps.0 (a).retry: Input should be a table" in rejection(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"500ms"', timedelta(milliseconds=500)),
        ('"2s"', timedelta(seconds=2)),
        ('"15m"', timedelta(minutes=15)),
        ('"1h"', timedelta(hours=1)),
        ('"1d"', timedelta(days=1)),
    ],
)
def test_max_duration_is_read(value: str, expected: timedelta) -> None:
    text = f'name = "t"\nmax_duration = {value}\n[[steps]]\nname = "a"\nhandler = "h"\n'
    assert parse_template(text).max_duration == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("15", "max_duration: a duration is a string such as '15m', not 15"),
        ('"15"', "max_duration: not a duration: '15'"),
        ('"1h30m"', "max_duration: not a duration: '1h30m'"),
        ('"0s"', "max_duration: a duration must be longer than zero"),
        ('"99999d"', "max_duration: duration '99999d' is over the limit"),
    ],
)
def test_a_bad_max_duration_is_one_error(value: str, expected: str) -> None:
    text = f'name = "t"\nmax_duration = {value}\n[[steps]]\nname = "a"\nhandler = "h"\n'
    assert expected in rejection(text)


def test_no_max_duration_means_no_deadline() -> None:
    assert parse_template('name = "t"\n[[steps]]\nname = "a"\nhandler = "h"\n').max_duration is None
