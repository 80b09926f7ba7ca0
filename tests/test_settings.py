"""load_settings: defaults, settings.toml, DUPLEX_<SECTION>__<KEY> overrides, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from duplex.errors import ConfigurationError
from duplex.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run each test in an empty directory with no DUPLEX_* variables set."""
    for name in list(os.environ):
        if name.upper().startswith("DUPLEX_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: str | Path | None = None) -> str:
    with pytest.raises(ConfigurationError) as info:
        load_settings(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_without_a_file() -> None:
    settings = load_settings()
    assert settings.database.url == "sqlite:///duplex.db"
    assert settings.worker.namespaces == ("default",)
    assert settings.worker.handler_modules == ()
    assert settings.worker.max_concurrent_handlers == 10
    assert settings.worker.handler_timeout_ms == 30_000
    assert settings.worker.shutdown_timeout_ms == 10_000
    assert settings.event_system.deployment_mode == "hybrid"
    assert settings.event_system.polling_interval_ms == 250
    assert settings.event_system.claim_timeout_s == 30.0
    assert settings.worker.heartbeat_interval_s == 5.0
    assert settings.domain_events.buffer_size == 10_000
    assert settings.logging.level == "INFO"
    assert settings.retry.backoff_multiplier == 2.0


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.worker.max_concurrent_handlers = 3  # type: ignore[misc]


def test_values_from_settings_toml_in_the_working_directory(tmp_path: Path) -> None:
    write(
        tmp_path / "settings.toml",
        """
[database]
url = "postgresql+psycopg://u@h/db"

[worker]
namespaces = ["a", "b"]
handler_modules = ["examples.orders"]
max_concurrent_handlers = 3
handler_timeout_ms = 1500

[event_system]
deployment_mode = "event_driven"
polling_interval_ms = 50
claim_timeout_s = 16.5

[domain_events]
buffer_size = 7

[logging]
level = "DEBUG"
""",
    )
    settings = load_settings()
    assert settings.database.url == "postgresql+psycopg://u@h/db"
    assert settings.worker.namespaces == ("a", "b")
    assert settings.worker.handler_modules == ("examples.orders",)
    assert settings.worker.max_concurrent_handlers == 3
    assert settings.worker.handler_timeout_ms == 1500
    # Keys the file leaves out keep their defaults.
    assert settings.worker.shutdown_timeout_ms == 10_000
    assert settings.event_system.deployment_mode == "event_driven"
    assert settings.event_system.polling_interval_ms == 50
    assert settings.event_system.claim_timeout_s == 16.5
    assert settings.domain_events.buffer_size == 7
    assert settings.logging.level == "DEBUG"


def test_explicit_file_path(tmp_path: Path) -> None:
    write(tmp_path / "settings.toml", "[worker]\nmax_concurrent_handlers = 2\n")
    other = write(tmp_path / "other.toml", "[worker]\nmax_concurrent_handlers = 5\n")
    assert load_settings(other).worker.max_concurrent_handlers == 5
    assert load_settings(str(other)).worker.max_concurrent_handlers == 5


def test_file_named_by_duplex_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "conf.toml", "[worker]\nprefetch = 9\n")
    monkeypatch.setenv("DUPLEX_SETTINGS", str(path))
    assert load_settings().worker.prefetch == 9


def test_env_beats_the_file_and_keeps_the_rest_of_the_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(
        tmp_path / "settings.toml",
        "[worker]\nmax_concurrent_handlers = 3\nprefetch = 2\n[logging]\nlevel = 'ERROR'\n",
    )
    monkeypatch.setenv("DUPLEX_WORKER__MAX_CONCURRENT_HANDLERS", "7")
    settings = load_settings()
    assert settings.worker.max_concurrent_handlers == 7
    assert settings.worker.prefetch == 2
    assert settings.logging.level == "ERROR"


def test_env_overrides_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUPLEX_WORKER__NAMESPACES", '["x", "y"]')
    monkeypatch.setenv("DUPLEX_EVENT_SYSTEM__DEPLOYMENT_MODE", "event_driven")
    monkeypatch.setenv("DUPLEX_DATABASE__URL", "sqlite:///elsewhere.db")
    settings = load_settings()
    assert settings.worker.namespaces == ("x", "y")
    assert settings.event_system.deployment_mode == "event_driven"
    assert settings.database.url == "sqlite:///elsewhere.db"


def test_env_variable_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("duplex_worker__max_concurrent_handlers", "4")
    assert load_settings().worker.max_concurrent_handlers == 4


def test_explicit_arguments_beat_env_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "settings.toml", "[worker]\nmax_concurrent_handlers = 3\n")
    monkeypatch.setenv("DUPLEX_WORKER__MAX_CONCURRENT_HANDLERS", "7")
    settings = Settings(worker={"max_concurrent_handlers": 11})
    assert settings.worker.max_concurrent_handlers == 11


# --- errors ------------------------------------------------------------------------------------


def test_unknown_key_in_the_file_is_named(tmp_path: Path) -> None:
    write(tmp_path / "settings.toml", "[worker]\nmax_concurent_handlers = 3\n")
    message = config_error()
    assert "worker.max_concurent_handlers" in message
    assert "unknown setting" in message
    assert "settings.toml" in message


def test_unknown_section_in_the_file_is_named(tmp_path: Path) -> None:
    write(tmp_path / "settings.toml", "[wrker]\nmax_concurrent_handlers = 3\n")
    message = config_error()
    assert "wrker" in message
    assert "unknown setting" in message


def test_unknown_key_in_env_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUPLEX_WORKER__MAX_CONCURENT_HANDLERS", "3")
    message = config_error()
    assert "worker.max_concurent_handlers" in message
    assert "unknown setting" in message
    assert "DUPLEX_WORKER__MAX_CONCURENT_HANDLERS" in message


def test_unknown_section_in_env_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUPLEX_WORKERS__MAX_CONCURRENT_HANDLERS", "3")
    message = config_error()
    assert "DUPLEX_WORKERS__MAX_CONCURRENT_HANDLERS" in message


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[worker]\nmax_concurrent_handlers = 0\n", "worker.max_concurrent_handlers"),
        ("[worker]\nmax_concurrent_handlers = 'lots'\n", "worker.max_concurrent_handlers"),
        ("[worker]\nhandler_timeout_ms = -1\n", "worker.handler_timeout_ms"),
        ("[event_system]\ndeployment_mode = 'nope'\n", "event_system.deployment_mode"),
        ("[event_system]\npolling_interval_ms = 0\n", "event_system.polling_interval_ms"),
        ("[domain_events]\nbuffer_size = 0\n", "domain_events.buffer_size"),
        ("[logging]\nlevel = 'LOUD'\n", "logging.level"),
        ("[retry]\njitter = 2.0\n", "retry.jitter"),
        ("worker = 3\n", "worker"),
    ],
)
def test_invalid_value_in_the_file_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    write(tmp_path / "settings.toml", toml)
    message = config_error()
    assert f"{key}:" in message
    assert "unknown setting" not in message


def test_invalid_value_in_the_file_names_the_file_that_set_it(tmp_path: Path) -> None:
    write(tmp_path / "settings.toml", "[event_system]\ndeployment_mode = 'nope'\n")
    message = config_error()
    assert message == (
        "invalid settings: event_system.deployment_mode: must be one of 'polling', "
        "'event_driven' or 'hybrid', not 'nope' (set in settings.toml)"
    )


def test_invalid_value_in_env_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUPLEX_WORKER__MAX_CONCURRENT_HANDLERS", "0")
    message = config_error()
    assert message == (
        "invalid settings: worker.max_concurrent_handlers: must be at least 1, not '0' "
        "(set by $DUPLEX_WORKER__MAX_CONCURRENT_HANDLERS)"
    )


def test_invalid_env_value_beats_a_valid_file_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "settings.toml", "[event_system]\ndeployment_mode = 'hybrid'\n")
    monkeypatch.setenv("DUPLEX_EVENT_SYSTEM__DEPLOYMENT_MODE", "nope")
    assert "event_system.deployment_mode" in config_error()


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    write(
        tmp_path / "settings.toml",
        "[worker]\nmax_concurrent_handlers = 0\nbogus = 1\n[event_system]\ndeployment_mode = 1\n",
    )
    message = config_error()
    for key in ("worker.max_concurrent_handlers", "worker.bogus", "event_system.deployment_mode"):
        assert key in message


def test_malformed_toml(tmp_path: Path) -> None:
    write(tmp_path / "settings.toml", "[worker\nmax_concurrent_handlers = 3\n")
    message = config_error()
    assert message.startswith("invalid settings in settings.toml:")


def test_malformed_toml_in_an_explicit_file(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.toml", "[worker]\nmax_concurrent_handlers = = 3\n")
    assert str(path) in config_error(path)


def test_missing_explicit_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    message = config_error(missing)
    assert "settings file not found" in message
    assert str(missing) in message


def test_explicit_path_that_is_a_directory(tmp_path: Path) -> None:
    assert "settings file not found" in config_error(tmp_path)


def test_missing_file_named_by_duplex_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DUPLEX_SETTINGS", str(tmp_path / "gone.toml"))
    message = config_error()
    assert "gone.toml" in message
    assert "DUPLEX_SETTINGS" in message


# --- errors in plain words, naming the source that set the value ------------------------------


def test_a_short_token_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "settings.toml", "[dashboard]\nport = 8421\n")
    monkeypatch.setenv("DUPLEX_DASHBOARD__TOKEN", "abc")
    message = config_error()
    assert message == (
        "invalid settings: dashboard.token: must be at least 16 characters long "
        "(set by $DUPLEX_DASHBOARD__TOKEN)"
    )  # the secret itself is never shown


def test_the_environment_is_named_when_it_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "settings.toml", "[worker]\nprefetch = 5\n")
    monkeypatch.setenv("duplex_worker__prefetch", "-1")  # named as it was written
    message = config_error()
    assert message.endswith(
        "worker.prefetch: must be at least 0, not '-1' (set by $duplex_worker__prefetch)"
    )
    assert "settings.toml" not in message


def test_a_whole_section_from_the_environment_names_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DUPLEX_WORKER", '{"max_concurrent_handlers": 2000}')
    assert config_error() == (
        "invalid settings: worker.max_concurrent_handlers: must be at most 1024, not 2000 "
        "(set by $DUPLEX_WORKER)"
    )


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[worker]\nmax_concurrent_handlers = 'lots'\n", "must be a whole number, not 'lots'"),
        ("[worker]\nmax_concurrent_handlers = 1.5\n", "must be a whole number, not 1.5"),
        ("[event_system]\npolling_interval_ms = 0\n", "must be greater than 0, not 0"),
        ("[retry]\njitter = 2.0\n", "must be at most 1.0, not 2.0"),
        ("[logging]\nserialize = 'maybe'\n", "must be true or false, not 'maybe'"),
        ("[worker]\nnamespaces = ['a', 3]\n", "worker.namespaces[1]: must be a string, not 3"),
        ("[relay]\nexchange = ''\n", "must be at least 1 character long, not ''"),
        ("worker = 3\n", "worker: must be a table of settings, not 3"),
    ],
)
def test_the_rule_is_said_in_plain_words(tmp_path: Path, toml: str, expected: str) -> None:
    write(tmp_path / "settings.toml", toml)
    message = config_error()
    assert f"{expected} (set in settings.toml)" in message
    assert "Input should" not in message
    assert "after validation" not in message


def test_a_rule_across_sections_names_where_each_value_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "settings.toml", "[worker]\nheartbeat_interval_s = 20\n")
    monkeypatch.setenv("DUPLEX_EVENT_SYSTEM__CLAIM_TIMEOUT_S", "30")
    assert config_error().endswith(
        "(worker.heartbeat_interval_s: set in settings.toml; "
        "event_system.claim_timeout_s: set by $DUPLEX_EVENT_SYSTEM__CLAIM_TIMEOUT_S)"
    )


def test_a_password_in_a_url_is_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUPLEX_RELAY__URL", "http://user:hunter2@broker/")
    message = config_error()
    assert "hunter2" not in message
    assert "'http://user:***@broker/'" in message
    assert "(set by $DUPLEX_RELAY__URL)" in message
