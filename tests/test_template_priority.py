"""Template key ``priority``: at the top level (the task's default) and per step; an integer
from -100 to 100, refused otherwise with one line naming where."""

from __future__ import annotations

import pytest

from duplex.errors import TemplateError
from duplex.templates import parse_template

BASE = 'name = "t"\n{top}[[steps]]\nname = "a"\nhandler = "h"\n{step}'
B = '[[steps]]\nname = "b"\nhandler = "h"\ndepends_on = ["a"]\n'


def test_priorities_default_to_zero_and_steps_inherit_the_task_priority() -> None:
    plain = parse_template(BASE.format(top="", step="") + B)
    assert [plain.step_priority(s) for s in plain.steps] == [0, 0]
    tpl = parse_template(BASE.format(top="priority = 5\n", step="priority = -2\n") + B)
    assert [tpl.step_priority(s) for s in tpl.steps] == [-2, 5]
    # A submission's priority replaces the task's, not a step's own.
    assert [tpl.step_priority(s, 9) for s in tpl.steps] == [-2, 9]


@pytest.mark.parametrize(
    ("top", "step", "where"),
    [
        ("priority = 101\n", "", "priority: Input should be less than or equal to 100"),
        (
            "",
            "priority = -101\n",
            "steps.0.priority: Input should be greater than or equal to -100",
        ),
        ("", 'priority = "high"\n', "steps.0.priority: Input should be a valid integer"),
        ("priority = 1.5\n", "", "priority: Input should be a valid integer"),
        ("", "priority = true\n", "steps.0.priority: Input should be a valid integer"),
    ],
)
def test_bad_priorities_are_refused_with_one_line(top: str, step: str, where: str) -> None:
    with pytest.raises(TemplateError) as refused:
        parse_template(BASE.format(top=top, step=step))
    message = str(refused.value)
    assert where in message, message
    assert "\n" not in message
