"""Tests for loading and validating TOML task templates."""

from __future__ import annotations

import json
import re
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import ValidationError

from duplex.errors import TemplateError
from duplex.templates import (
    EventDeclaration,
    StepTemplate,
    TaskTemplate,
    load_template,
    parse_template,
)

VALID = """
name = "order_fulfillment"
namespace = "orders"
version = "2.1.0"
description = "Validate, charge, ship."

[[steps]]
name = "validate"
handler = "orders.validate"
inputs = { strict = true, limits = { max_items = 10 }, tags = ["a", "b"] }

[[steps]]
name = "charge"
handler = "orders.charge"
depends_on = ["validate"]
max_attempts = 5
retryable = false
timeout_ms = 5000

[[steps.events]]
name = "payment.charged"

[[steps.events]]
name = "payment.failed"
condition = "failure"

[[steps]]
name = "ship"
handler = "orders.ship"
depends_on = ["charge"]
"""


def toml_string(value: str) -> str:
    """Quote a string for TOML; JSON basic strings are valid TOML basic strings."""
    return json.dumps(value)


def render(steps: list[tuple[str, list[str]]], name: str = "generated") -> str:
    """Render (step name, dependencies) pairs as template TOML, in the given order."""
    lines = [f"name = {toml_string(name)}"]
    for step, deps in steps:
        lines += [
            "",
            "[[steps]]",
            f"name = {toml_string(step)}",
            'handler = "h.run"',
            f"depends_on = [{', '.join(toml_string(dep) for dep in deps)}]",
        ]
    return "\n".join(lines) + "\n"


def step_toml(extra: str = "", *, name: str = "a") -> str:
    """Return a one-step template with ``extra`` lines added to the step."""
    return f'name = "t"\n\n[[steps]]\nname = "{name}"\nhandler = "h.run"\n{extra}\n'


def rejection(text: str) -> str:
    """Return the TemplateError message for ``text``, checking it is one line."""
    with pytest.raises(TemplateError) as info:
        parse_template(text, source="x.toml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("x.toml: ")
    return message


# --- valid templates ------------------------------------------------------------------


def test_valid_template_round_trip() -> None:
    template = parse_template(VALID)

    assert template.name == "order_fulfillment"
    assert template.namespace == "orders"
    assert template.version == "2.1.0"
    assert [step.name for step in template.steps] == ["validate", "charge", "ship"]
    validate, charge, ship = template.steps
    assert validate.inputs == {"strict": True, "limits": {"max_items": 10}, "tags": ["a", "b"]}
    assert validate.max_attempts == 3
    assert validate.retryable is True
    assert validate.timeout_ms is None
    assert charge.depends_on == ("validate",)
    assert charge.max_attempts == 5
    assert charge.retryable is False
    assert charge.timeout_ms == 5000
    assert charge.events == (
        EventDeclaration(name="payment.charged", condition="success"),
        EventDeclaration(name="payment.failed", condition="failure"),
    )
    assert ship.events == ()
    # Dumping and validating again gives an equal template.
    assert TaskTemplate.model_validate(template.model_dump()) == template
    assert TaskTemplate.model_validate_json(template.model_dump_json()) == template


def test_defaults_apply() -> None:
    template = parse_template(step_toml())

    assert template.namespace == "default"
    assert template.version == "1.0.0"
    assert template.description == ""
    assert template.steps[0].depends_on == ()
    assert template.steps[0].inputs == {}


def test_models_are_frozen() -> None:
    template = parse_template(VALID)

    with pytest.raises(ValidationError):
        template.name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        template.steps[0].max_attempts = 9  # type: ignore[misc]


def test_topological_order_is_stable() -> None:
    # d and b are both ready at the start; template order puts d first.
    template = parse_template(
        render([("d", []), ("c", ["b"]), ("b", []), ("a", ["d", "c"]), ("e", ["b"])])
    )

    assert [step.name for step in template.topological_order()] == ["d", "b", "c", "a", "e"]


def test_thousand_step_fan_out_fan_in_validates() -> None:
    middle = [f"work_{i}" for i in range(998)]
    steps = [("start", []), *[(name, ["start"]) for name in middle], ("finish", middle)]

    template = parse_template(render(steps))

    order = [step.name for step in template.topological_order()]
    assert len(order) == 1000
    assert order[0] == "start"
    assert order[-1] == "finish"


# --- invalid templates ----------------------------------------------------------------


def test_cycle_names_the_steps_in_order() -> None:
    message = rejection(render([("a", ["c"]), ("b", ["a"]), ("c", ["b"]), ("d", [])]))

    assert message == "x.toml: invalid template: cycle: a -> b -> c -> a"


def test_cycle_reached_through_an_acyclic_prefix() -> None:
    # root feeds the cycle, and leaf hangs off it: only the cycle is named.
    steps = [("root", []), ("leaf", ["y"]), ("y", ["x"]), ("x", ["root", "y"])]

    # y comes before x in the template, so the cycle is read from y.
    assert rejection(render(steps)).endswith("cycle: y -> x -> y")


def test_self_dependency() -> None:
    message = rejection(step_toml('depends_on = ["a"]'))

    assert "steps.0: step 'a' depends on itself" in message


def test_unknown_dependency_names_step_and_dependency() -> None:
    message = rejection(render([("a", []), ("b", ["a", "missing"])]))

    assert "step 'b' depends on unknown step 'missing'" in message


def test_duplicate_step_name() -> None:
    message = rejection(render([("a", []), ("b", []), ("a", ["b"])]))

    assert "duplicate step name 'a' (steps.0 and steps.2)" in message


def test_duplicate_dependency_entry() -> None:
    message = rejection(render([("a", []), ("b", ["a", "a"])]))

    assert "steps.1: step 'b' lists dependency 'a' more than once" in message


def test_unknown_top_level_field() -> None:
    message = rejection("colour = 'blue'\n" + step_toml())

    assert message == "x.toml: invalid template: colour: unknown field"


def test_unknown_step_field() -> None:
    message = rejection(step_toml("timeout = 5"))

    assert message == "x.toml: invalid template: steps.0.timeout: unknown field"


def test_unknown_event_field() -> None:
    message = rejection(step_toml('events = [{ name = "e", when = "now" }]'))

    assert "steps.0.events.0.when: unknown field" in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("max_attempts = 0", "steps.1.max_attempts: Input should be greater than or equal to 1"),
        ("max_attempts = 101", "steps.1.max_attempts: Input should be less than or equal to 100"),
        ('max_attempts = "3"', "steps.1.max_attempts: Input should be a valid integer"),
        ("max_attempts = 2.0", "steps.1.max_attempts: Input should be a valid integer"),
        ("timeout_ms = 0", "steps.1.timeout_ms: Input should be greater than 0"),
        ("timeout_ms = -5", "steps.1.timeout_ms: Input should be greater than 0"),
        ("timeout_ms = true", "steps.1.timeout_ms: Input should be a valid integer"),
        ("retryable = 1", "steps.1.retryable: Input should be a valid boolean"),
        ('depends_on = "a"', "steps.1.depends_on: Input should be an array"),
        ("inputs = 5", "steps.1.inputs: Input should be a table"),
    ],
)
def test_bad_step_value(line: str, expected: str) -> None:
    text = f"""
name = "t"

[[steps]]
name = "a"
handler = "h.run"

[[steps]]
name = "b"
handler = "h.run"
{line}
"""
    assert rejection(text) == f"x.toml: invalid template: {expected}"


def test_bad_event_condition() -> None:
    message = rejection(step_toml('events = [{ name = "e", condition = "sometimes" }]'))

    assert "steps.0.events.0.condition: Input should be 'success', 'failure' or 'always'" in (
        message
    )


def test_empty_event_name() -> None:
    assert "steps.0.events.0.name:" in rejection(step_toml('events = [{ name = "" }]'))


@pytest.mark.parametrize("name", ["", "has space", "slash/ed", "new\\nline"])
def test_bad_step_name(name: str) -> None:
    message = rejection(step_toml(name=name))

    assert "steps.0.name:" in message


def test_missing_fields() -> None:
    message = rejection('[[steps]]\nname = "a"\n')

    assert message == (
        "x.toml: invalid template: name: Field required; "
        "steps.0: step 'a': a handler step needs a `handler`"
    )


def test_no_steps() -> None:
    assert "steps: Field required" in rejection('name = "t"\n')
    assert rejection('name = "t"\nsteps = []\n') == (
        "x.toml: invalid template: steps: a template needs at least one step"
    )


def test_empty_handler() -> None:
    message = rejection(step_toml().replace('"h.run"', '""'))

    assert message == (
        "x.toml: invalid template: steps.0.handler: String should have at least 1 character"
    )


@pytest.mark.parametrize(
    "value", ["1979-05-27T07:32:00Z", "1979-05-27", "07:32:00", "nan", "inf", "[1, -inf]"]
)
def test_inputs_must_be_json_values(value: str) -> None:
    message = rejection(step_toml(f"inputs = {{ deep = {{ v = {value} }} }}"))

    assert "steps.0.inputs: inputs.deep.v" in message


def test_many_errors_are_summarised_on_one_line() -> None:
    text = render([(f"s{i}", []) for i in range(30)]).replace('handler = "h.run"', "bad = 1")

    message = rejection(text)

    assert message.count("; ") == 10
    assert message.endswith("and 20 more error(s)")


def test_bad_toml() -> None:
    message = rejection('name = "t"\n[[steps]\n')

    assert message.startswith("x.toml: invalid TOML: ")
    assert "line 2" in message


def test_default_source() -> None:
    with pytest.raises(TemplateError, match=r"^<template>: invalid TOML: "):
        parse_template("= 1")


def test_direct_construction_still_validates() -> None:
    with pytest.raises(ValidationError, match="cycle: a -> b -> a"):
        TaskTemplate(
            name="t",
            steps=(
                StepTemplate(name="a", handler="h", depends_on=("b",)),
                StepTemplate(name="b", handler="h", depends_on=("a",)),
            ),
        )


# --- loading from files ---------------------------------------------------------------


def test_load_by_path(tmp_path: Path) -> None:
    path = tmp_path / "anything.toml"
    path.write_text(VALID, encoding="utf-8")

    assert load_template(str(path)) == parse_template(VALID)


def test_load_reports_the_file_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(step_toml("max_attempts = 0"), encoding="utf-8")

    with pytest.raises(TemplateError) as info:
        load_template(str(path))

    assert str(info.value) == (
        f"{path}: invalid template: steps.0.max_attempts: "
        "Input should be greater than or equal to 1"
    )


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"

    with pytest.raises(TemplateError, match=r"^template not found: .*nope\.toml \(no such file\)"):
        load_template(str(missing), tmp_path)


def test_directory_is_not_a_template(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="is a directory"):
        load_template(str(tmp_path))


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))

    with pytest.raises(TemplateError, match=r"latin1\.toml: not valid UTF-8: byte 0xe9"):
        load_template(str(path))


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + step_toml().encode())

    assert load_template(str(path)).name == "t"


def test_lookup_by_file_stem(tmp_path: Path) -> None:
    (tmp_path / "order_fulfillment.toml").write_text(VALID, encoding="utf-8")

    assert load_template("order_fulfillment", tmp_path).name == "order_fulfillment"


def test_lookup_by_name_field(tmp_path: Path) -> None:
    (tmp_path / "orders.toml").write_text(VALID, encoding="utf-8")
    (tmp_path / "other.toml").write_text(step_toml(), encoding="utf-8")
    (tmp_path / "broken.toml").write_text("this is = = not toml", encoding="utf-8")

    assert load_template("order_fulfillment", tmp_path) == parse_template(VALID)


def test_lookup_by_name_reports_that_templates_errors(tmp_path: Path) -> None:
    (tmp_path / "orders.toml").write_text(VALID + "oops = 1\n", encoding="utf-8")

    with pytest.raises(TemplateError, match=r"orders\.toml: invalid template: .*unknown field"):
        load_template("order_fulfillment", tmp_path)


def test_unknown_name_says_what_was_tried(tmp_path: Path) -> None:
    (tmp_path / "other.toml").write_text(step_toml(), encoding="utf-8")
    (tmp_path / "broken.toml").write_text("this is = = not toml", encoding="utf-8")

    with pytest.raises(TemplateError) as info:
        load_template("ghost", tmp_path)

    message = str(info.value)
    assert message.startswith("template not found: 'ghost'")
    assert str(tmp_path / "ghost.toml") in message
    assert "has name = 'ghost'" in message
    assert f"unreadable: {tmp_path / 'broken.toml'}" in message


def test_unknown_name_without_a_directory() -> None:
    with pytest.raises(TemplateError, match="no templates directory"):
        load_template("ghost-template-that-does-not-exist")


def test_ambiguous_name(tmp_path: Path) -> None:
    (tmp_path / "one.toml").write_text(step_toml(), encoding="utf-8")
    (tmp_path / "two.toml").write_text(step_toml(), encoding="utf-8")

    with pytest.raises(TemplateError, match=r"template name 't' is ambiguous: .*one\.toml, .*two"):
        load_template("t", tmp_path)


# --- properties -----------------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn, max_steps: int = 25) -> list[tuple[str, list[str]]]:
    """Draw a DAG as (name, dependencies) in a shuffled order.

    Step i depends only on a subset of steps 0..i-1, which makes it acyclic;
    the shuffle makes sure template order is not already a topological order.
    """
    count = draw(st.integers(min_value=1, max_value=max_steps))
    names = [f"s{i}" for i in range(count)]
    steps = [
        (names[i], draw(st.lists(st.sampled_from(names[:i]), unique=True)) if i else [])
        for i in range(count)
    ]
    return draw(st.permutations(steps))


def reference_order(steps: list[tuple[str, list[str]]]) -> list[str]:
    """Repeatedly take the first ready step in template order (the stable rule)."""
    done: list[str] = []
    remaining = list(steps)
    while remaining:
        position = next(i for i, (_, deps) in enumerate(remaining) if set(deps) <= set(done))
        done.append(remaining.pop(position)[0])
    return done


@given(dags())
def test_topological_order_puts_parents_first(steps: list[tuple[str, list[str]]]) -> None:
    template = parse_template(render(steps))

    order = [step.name for step in template.topological_order()]

    assert sorted(order) == sorted(name for name, _ in steps)
    assert len(set(order)) == len(order)
    position = {name: i for i, name in enumerate(order)}
    for name, deps in steps:
        for dep in deps:
            assert position[dep] < position[name]
    assert order == reference_order(steps)


def descendants(steps: list[tuple[str, list[str]]], root: str) -> set[str]:
    """Return every step that depends on ``root``, directly or not."""
    children: dict[str, list[str]] = {name: [] for name, _ in steps}
    for name, deps in steps:
        for dep in deps:
            children[dep].append(name)
    found: set[str] = set()
    pending = [root]
    while pending:
        for child in children[pending.pop()]:
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


@given(dags(), st.data())
def test_back_edge_is_rejected_as_a_cycle(
    steps: list[tuple[str, list[str]]], data: st.DataObject
) -> None:
    pairs = [(name, below) for name, _ in steps for below in sorted(descendants(steps, name))]
    assume(pairs)
    ancestor, descendant = data.draw(st.sampled_from(pairs))
    # Make the ancestor depend on its own descendant: that closes a loop.
    cyclic = [(name, [*deps, descendant] if name == ancestor else deps) for name, deps in steps]

    with pytest.raises(TemplateError) as info:
        parse_template(render(cyclic))

    match = re.fullmatch(r"<template>: invalid template: cycle: (.+)", str(info.value))
    assert match is not None
    named = match.group(1).split(" -> ")
    assert named[0] == named[-1]
    assert len(set(named[:-1])) == len(named) - 1
    dependencies = dict(cyclic)
    for parent, child in pairwise(named):
        assert parent in dependencies[child]
