"""Fixtures of the end-to-end tests: ``make_cluster`` builds PostgreSQL clusters of
``duplex run`` processes (``tests/e2e/support.py``) and removes them afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from duplex.settings import DatabaseSettings
from duplex.storage.db import Database
from duplex.storage.listen import libpq_url
from duplex.storage.migrate import upgrade_to_head
from tests.conftest import (
    create_postgres_schema,
    drop_postgres_schema,
    postgres_schema_url,
    require_postgres,
)
from tests.e2e.support import Cluster, settings_toml

REPO_ROOT = Path(__file__).resolve().parents[2]
HANDLER_MODULE = "tests.e2e_handlers.kills"


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Build clusters; afterwards kill every worker process and drop every schema."""
    require_postgres()
    made: list[Cluster] = []
    schemas: list[str] = []

    def make(sections: dict[str, dict[str, Any]], env: dict[str, str] | None = None) -> Cluster:
        schema = create_postgres_schema()
        schemas.append(schema)
        app_name = f"duplex-faults-{uuid.uuid4().hex[:8]}"
        url = f"{postgres_schema_url(schema)}&application_name={app_name}"
        directory = tmp_path / schema
        directory.mkdir()
        worker_cfg = {
            "handler_modules": [HANDLER_MODULE],
            "shutdown_timeout_ms": 15000,
            **sections.get("worker", {}),
        }
        all_sections = {
            **sections,
            "worker": worker_cfg,
            "retry": {"backoff_base_ms": 100, "jitter": 0.0, **sections.get("retry", {})},
            "logging": {"level": "INFO"},
        }
        (directory / "settings.toml").write_text(settings_toml(url, all_sections))
        db = Database(DatabaseSettings(url=postgres_schema_url(schema)))
        upgrade_to_head(db)
        proc_env = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEX_")}
        proc_env.update(
            PYTHONPATH=str(REPO_ROOT),
            PYTHONUNBUFFERED="1",
            KILLS_RUN_LOG=str(directory / "runs.log"),
            KILLS_HOLD=str(directory / "hold"),
            KILLS_HELD_LOG=str(directory / "held.log"),
            **(env or {}),
        )
        sql_conn = psycopg.connect(
            libpq_url(postgres_schema_url(schema)) + "&application_name=duplex-faults-test",
            autocommit=True,
        )
        cluster = Cluster(directory, schema, url, app_name, proc_env, db, sql_conn)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.hold.unlink(missing_ok=True)
            # Before the schema goes: a worker frozen inside a transaction would hold its
            # locks, and DROP SCHEMA would wait for it.
            for worker in cluster.workers:
                worker.kill()
            cluster.sql_conn.close()
            cluster.db.dispose()
        for schema in schemas:
            if not os.environ.get("KILLS_KEEP_SCHEMA"):
                drop_postgres_schema(schema)
