"""Alembic environment, configured in code by ``duplex.storage.migrate``.

The stock env.py calls ``logging.config.fileConfig``, which disables every existing logger
(pykka's crash reports among them); this one leaves logging alone.
"""

from __future__ import annotations

from alembic import context

from duplex.storage.models import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `duplex migrate`, which provides the connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
