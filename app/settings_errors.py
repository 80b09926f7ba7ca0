"""Settings errors in plain words: one line naming each bad key, its rule and its source.

pydantic's messages speak of Python types; a settings file speaks TOML. Each problem becomes
``section.key: the rule in words, not the value (where the value came from)``, with secrets
never echoed and URL passwords masked.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails


def describe_invalid(exc: ValidationError, toml_file: Path | None, model: type[BaseModel]) -> str:
    """One line: per problem, the key, the rule in plain words, and where the value came from."""
    file_values = _file_values(toml_file)
    problems = []
    for error in exc.errors():
        loc = error["loc"]
        if not loc:  # a rule across sections: its message names the keys
            message = error["msg"].removeprefix("Value error, ")
            keys = re.findall(r"\b([a-z_]+\.[a-z_]+)\b", message)
            sources = [f"{key}: {_source(key, file_values, toml_file)}" for key in keys]
            problems.append(f"{message} ({'; '.join(sources)})" if sources else message)
            continue
        key = _key(loc)
        rule = _plain_rule(error, secret=_is_secret(model, loc))
        problems.append(f"{key}: {rule} ({_source(key, file_values, toml_file)})")
    return _without_passwords("invalid settings: " + "; ".join(problems))


def _key(loc: tuple[int | str, ...]) -> str:
    """``worker.namespaces[1]`` for the location ``("worker", "namespaces", 1)``."""
    text = ".".join(str(part) for part in loc if not isinstance(part, int))
    return text + "".join(f"[{part}]" for part in loc if isinstance(part, int))


# Rules whose pydantic message is about Python types, in the words of a settings file.
_TYPE_RULES = {
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "path_type": "must be a path",
    "model_type": "must be a table of settings",
    "model_attributes_type": "must be a table of settings",
    "dict_type": "must be a table of settings",
}
# Bounds: pydantic's context key, and the words before the bound.
_BOUNDS = {
    "greater_than": ("gt", "must be greater than"),
    "greater_than_equal": ("ge", "must be at least"),
    "less_than": ("lt", "must be less than"),
    "less_than_equal": ("le", "must be at most"),
}


def _plain_rule(error: ErrorDetails, *, secret: bool) -> str:
    """What the value must be, in words, and (unless secret) the value that broke the rule."""
    kind, ctx, given = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "extra_forbidden":
        return "unknown setting"
    if kind == "value_error":  # a validator of ours: its message shows the value already
        return error["msg"].removeprefix("Value error, ")
    if kind in _TYPE_RULES:
        rule = _TYPE_RULES[kind]
    elif kind in _BOUNDS:
        bound, words = _BOUNDS[kind]
        rule = f"{words} {ctx.get(bound)}"
    elif kind in ("too_short", "string_too_short", "too_long", "string_too_long"):
        unit = "character" if isinstance(given, str) else "item"
        least = kind.endswith("short")
        limit = ctx.get("min_length" if least else "max_length")
        plural = "" if limit == 1 else "s"
        rule = f"must be {'at least' if least else 'at most'} {limit} {unit}{plural} long"
    elif kind == "literal_error":
        rule = f"must be one of {ctx.get('expected')}"
    else:
        rule = error["msg"]
    if secret or isinstance(given, dict):
        return rule  # a secret is never echoed, nor a whole table
    return f"{rule}, not {given!r}"


def _is_secret(model: type[BaseModel], loc: tuple[int | str, ...]) -> bool:
    """Whether the value at ``loc`` is a secret (``SecretStr``), never to be echoed."""
    if len(loc) < 2 or not isinstance(loc[0], str) or not isinstance(loc[1], str):
        return False
    section = model.model_fields.get(loc[0])
    fields = getattr(section.annotation if section else None, "model_fields", {})
    field = fields.get(loc[1])
    return field is not None and "SecretStr" in str(field.annotation)


# The password of a URL (``amqp://user:password@host``), which an error line must not show.
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s']*:)[^@\s']*@", re.IGNORECASE)


def _without_passwords(text: str) -> str:
    return _URL_PASSWORD.sub(r"\1***@", text)


def _file_values(toml_file: Path | None) -> dict[str, Any]:
    if toml_file is None:
        return {}
    try:
        with toml_file.open("rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _source(key: str, file_values: dict[str, Any], toml_file: Path | None) -> str:
    """Where the value of ``key`` (``section.name``) came from: the variable that set it (the
    environment wins over the file), the file, or the default."""
    section, _, name = key.partition(".")
    name = name.split("[", 1)[0]
    wanted = [f"DUPLEX_{section}__{name}".upper()] if name else []
    wanted.append(f"DUPLEX_{section}".upper())  # a whole section as JSON
    for candidate in wanted:
        for variable in sorted(os.environ):
            if variable.upper() == candidate:
                return f"set by ${variable}"
    in_file = file_values.get(section)
    if toml_file is not None and (
        (not name and in_file is not None) or (isinstance(in_file, dict) and name in in_file)
    ):
        return f"set in {toml_file}"
    return "default"


def describe_unparsable(exc: ValueError, toml_file: Path | None) -> str:
    """One line for a TOML file or environment value that cannot be parsed at all."""
    text = _one_line(str(exc))
    env_field = re.search(r'field "(\w+)" from source "EnvSettingsSource"', text)
    if env_field:
        prefix = f"DUPLEX_{env_field.group(1).upper()}__"
        matching = sorted(k for k in os.environ if k.upper().startswith(prefix))
        names = ", ".join(matching) or f"{prefix}*"
        return (
            f"invalid settings: cannot parse environment variable {names} "
            '(lists and tables must be JSON, e.g. \'["a", "b"]\')'
        )
    where = f" in {toml_file}" if toml_file else ""
    return f"invalid settings{where}: {text}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
