"""Settings: ``settings.toml`` overridden by ``DUPLEX_<SECTION>__<KEY>`` environment variables.

Read once at the edge (the CLI) and passed down as typed, frozen sections. A value that breaks a
rule is reported in plain words by ``duplex.settings_errors``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from duplex.errors import ConfigurationError
from duplex.flow.rates import DeclaredLimit
from duplex.settings_errors import describe_invalid, describe_unparsable

SETTINGS_FILE_ENV = "DUPLEX_SETTINGS"
DEFAULT_SETTINGS_FILE = "settings.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseSettings(_Section):
    """Where the orchestration tables live."""

    url: str = "sqlite:///duplex.db"
    busy_timeout_ms: int = Field(default=5000, ge=0)
    pool_size: int = Field(default=5, ge=1)
    # PostgreSQL: how long opening a connection may take (libpq counts whole seconds, at
    # least 2). A ``connect_timeout`` in the URL wins.
    connect_timeout_s: int = Field(default=10, ge=2, le=3600)


class WorkerSettings(_Section):
    """How many handlers run at once, and for how long."""

    id: str | None = None
    namespaces: tuple[str, ...] = ("default",)
    handler_modules: tuple[str, ...] = ()
    max_concurrent_handlers: int = Field(default=10, ge=1, le=1024)
    # The ceiling of the prefetch window, which follows the handlers' pace (duplex.intake.prefetch).
    prefetch: int = Field(default=200, ge=0, le=1024)
    handler_timeout_ms: int = Field(default=30_000, gt=0, le=604_800_000)
    shutdown_timeout_ms: int = Field(default=10_000, ge=0, le=86_400_000)
    max_result_bytes: int = Field(default=1_000_000, gt=0)
    # The most items a batch step's handler may return (``Batch``): each becomes a step row,
    # all created in the one transaction that commits the batch step.
    max_batch_items: int = Field(default=100_000, gt=0)
    commit_batch_size: int = Field(default=500, ge=1)
    commit_linger_ms: float = Field(default=5.0, ge=0, le=1000)
    # A commit that makes dependents ready claims some for this worker in the same transaction
    # and hands them straight to the Dispatcher (one per completed parent, at most
    # max_concurrent_handlers per commit); off, every step goes through the queue.
    eager_dispatch: bool = True
    # How much waiting one priority level is worth: a step of priority p waits at most
    # (q - p) * priority_aging_ms behind steps of priority q that became ready after it
    # (docs/time.md, Priority).
    priority_aging_ms: int = Field(default=1000, ge=1, le=86_400_000)
    # At most a third of event_system.claim_timeout_s (checked in ``Settings``).
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    # How long ``duplex run`` keeps retrying a database that fails transiently during
    # start-up (migration, registration) before it gives up with one line.
    startup_timeout_s: float = Field(default=60.0, gt=0, le=86_400)
    # How often this worker looks for tasks past their deadline (``max_duration``) and cancels
    # their waiting steps (duplex.storage.deadlines). Running attempts are cancelled on time
    # by the worker running them; this only bounds how late waiting steps are cancelled.
    deadline_sweep_interval_ms: int = Field(default=1000, gt=0, le=3_600_000)


class EventSystemSettings(_Section):
    """How the worker learns that work is available."""

    # PostgreSQL: LISTEN/NOTIFY wakes the intake at once, the poll is the fallback. SQLite:
    # every mode polls and takes local wake-ups.
    deployment_mode: Literal["polling", "event_driven", "hybrid"] = "hybrid"
    polling_interval_ms: int = Field(default=250, gt=0)
    # The liveness timeout: a worker whose heartbeat is older than this is presumed dead and
    # its running attempts are recovered (``worker_lost``).
    claim_timeout_s: float = Field(default=30.0, gt=0)


class RetrySettings(_Section):
    """Backoff for retryable failures: ``base * multiplier ** (attempt - 1)``, capped, jittered."""

    backoff_base_ms: int = Field(default=1000, ge=0)
    backoff_multiplier: float = Field(default=2.0, ge=1.0)
    backoff_max_ms: int = Field(default=300_000, ge=0)
    jitter: float = Field(default=0.1, ge=0.0, le=1.0)
    # How the delay grows with the attempts (duplex.commit.retry); a step may override every
    # field here with ``[steps.retry]`` in its template.
    strategy: Literal["exponential", "linear", "fixed"] = "exponential"


class DomainEventSettings(_Section):
    """In-process delivery of committed domain events."""

    buffer_size: int = Field(default=10_000, ge=1)


class RelaySettings(_Section):
    """The outbox relay: committed domain events to a RabbitMQ topic exchange."""

    enabled: bool = False
    url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    exchange: str = Field(default="duplex.events", min_length=1, max_length=255)
    # Events per database transaction of the relay (and per round of confirms).
    batch_size: int = Field(default=100, ge=1, le=10_000)
    # Failed publications of one event before it is dead-lettered.
    max_attempts: int = Field(default=5, ge=1, le=1000)
    # A message no queue is bound for: "published" (the broker took it; routing is the
    # topology's business) or "retry" (counted as a failed attempt).
    unroutable: Literal["published", "retry"] = "published"
    # The fallback poll, for commits of other processes when no NOTIFY reaches the relay.
    poll_interval_ms: int = Field(default=1000, gt=0, le=3_600_000)
    # Backoff after a broker failure, and between failed attempts of one event.
    backoff_base_ms: int = Field(default=200, gt=0)
    backoff_max_ms: int = Field(default=10_000, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=300)

    @field_validator("url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        if not value.startswith(("amqp://", "amqps://")):
            raise ValueError(f"not an amqp:// or amqps:// URL: {value!r}")
        try:
            import pika

            pika.URLParameters(value)
        except Exception as exc:
            raise ValueError(f"not a usable AMQP URL ({exc})") from None
        return value

    @field_validator("exchange")
    @classmethod
    def _exchange_name(cls, value: str) -> str:
        # RabbitMQ reserves the amq. prefix; declaring such an exchange fails at run time.
        if value.startswith("amq."):
            raise ValueError(f"exchange names starting with 'amq.' are reserved: {value!r}")
        return value


class LoggingSettings(_Section):
    """Log level and format."""

    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # JSON lines (one object per line, step fields as top-level keys) for log shippers.
    serialize: bool = False


class ObservabilitySettings(_Section):
    """The HTTP endpoints (health, metrics), saturation warnings and tracing."""

    # Off by default; 0 picks a free port (the log line names the one bound).
    http_port: int | None = Field(default=None, ge=0, le=65535)
    # Loopback unless the operator says otherwise: /health and /metrics need no auth.
    http_host: str = Field(default="127.0.0.1", min_length=1)
    # Needs the optional extra ``duplex[tracing]`` (opentelemetry-api).
    tracing: bool = False
    # The queue figures (ready steps, oldest ready age) cost a query: at most one per this.
    queue_refresh_s: float = Field(default=5.0, ge=0)
    # Saturation warnings: at most one line per condition per interval.
    saturation_interval_s: float = Field(default=60.0, gt=0)


class DashboardSettings(_Section):
    """``duplex dashboard``: the web UI over the orchestration tables."""

    # Loopback unless the operator says otherwise; any other address needs ``token``.
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8420, ge=0, le=65535)
    # The shared secret of the login page (and of ``Authorization: Bearer``). When set, every
    # page needs it, on loopback too.
    token: SecretStr | None = Field(default=None, min_length=16)
    # How often open pages refresh their live part.
    refresh_ms: int = Field(default=1000, ge=200, le=60_000)
    page_size: int = Field(default=50, ge=1, le=500)
    # Hours a login lasts.
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30)


class TemplateSettings(_Section):
    """Where ``duplex submit NAME`` looks for templates."""

    directory: Path = Path("templates")


class ScheduleSettings(_Section):
    """The schedule firer every worker runs (docs/time.md, Schedules)."""

    # Whether this worker fires due schedules (any number of workers may: each fire time
    # still creates one task).
    enabled: bool = True
    # How often it looks for due schedules: the most a fire can be late on a healthy worker.
    poll_interval_ms: int = Field(default=1000, gt=0, le=3_600_000)
    # Schedules acted on per transaction.
    batch_size: int = Field(default=100, ge=1, le=10_000)
    # A fire made later than this after its fire time counts as overdue in /metrics.
    overdue_after_ms: int = Field(default=5000, gt=0)
    # The fire history kept per schedule (``schedule_fires`` rows, newest first).
    keep_fires: int = Field(default=1000, ge=1, le=1_000_000)


class Settings(BaseSettings):
    """All settings of a Duplex process."""

    model_config = SettingsConfigDict(
        env_prefix="DUPLEX_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    database: DatabaseSettings = DatabaseSettings()
    worker: WorkerSettings = WorkerSettings()
    event_system: EventSystemSettings = EventSystemSettings()
    retry: RetrySettings = RetrySettings()
    domain_events: DomainEventSettings = DomainEventSettings()
    relay: RelaySettings = RelaySettings()
    logging: LoggingSettings = LoggingSettings()
    templates: TemplateSettings = TemplateSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    dashboard: DashboardSettings = DashboardSettings()
    schedules: ScheduleSettings = ScheduleSettings()
    # Rate limits a worker creates at start if SQL has none of the name (docs/flow-control.md):
    # ``NAME = "100/s"`` or ``NAME = { rate = "100/s", burst = 20 }``.
    rate_limits: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,255}$")], DeclaredLimit] = {}

    @model_validator(mode="after")
    def _heartbeat_fits_the_liveness_timeout(self) -> Settings:
        interval = self.worker.heartbeat_interval_s
        timeout = self.event_system.claim_timeout_s
        if interval * 3 > timeout:
            # A live worker must beat at least three times within the timeout, or one late
            # beat would get it presumed dead and its running steps recovered from under it.
            raise ValueError(
                f"worker.heartbeat_interval_s ({interval:g}) must be at most a third of "
                f"event_system.claim_timeout_s ({timeout:g})"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then the environment, then the TOML file
        # (``toml_file`` in the model config, set by ``load_settings``).
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def settings_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """Return the settings file to read: explicit, ``$DUPLEX_SETTINGS``, or ./settings.toml."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigurationError(f"settings file not found: {path}")
        return path
    from_env = os.environ.get(SETTINGS_FILE_ENV)
    if from_env:
        path = Path(from_env)
        if not path.is_file():
            raise ConfigurationError(f"settings file not found: {path} (from ${SETTINGS_FILE_ENV})")
        return path
    default = Path(DEFAULT_SETTINGS_FILE)
    return default if default.is_file() else None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read and validate the settings; raise ``ConfigurationError`` naming the bad key."""
    toml_file = settings_path(path)
    _reject_unknown_env_sections()
    # A subclass per load carries the file in its config, so no global state is involved.
    reader: type[Settings] = type(
        "Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": toml_file}}
    )
    try:
        return reader()
    except ValidationError as exc:
        raise ConfigurationError(describe_invalid(exc, toml_file, Settings)) from None
    except ValueError as exc:  # malformed TOML or an undecodable environment value
        raise ConfigurationError(describe_unparsable(exc, toml_file)) from None


def _reject_unknown_env_sections() -> None:
    # pydantic-settings ignores DUPLEX_<SECTION>__<KEY> for a section it doesn't know, which
    # would hide a typo such as DUPLEX_WORKERS__MAX_CONCURRENT_HANDLERS.
    unknown = sorted(
        name
        for name in os.environ
        if name.upper().startswith("DUPLEX_")
        and "__" in name[len("DUPLEX_") :]
        and name[len("DUPLEX_") :].split("__", 1)[0].lower() not in Settings.model_fields
    )
    if unknown:
        raise ConfigurationError(
            "invalid settings: "
            + "; ".join(f"${name}: unknown settings section" for name in unknown)
        )
