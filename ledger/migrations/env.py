"""Alembic environment: runs on the engine the project is configured for."""

from __future__ import annotations

import importlib

from alembic import context
from sqlalchemy import Connection

from ledger.db import Base, make_engine
from ledger.models import compared_with_models

# Every package's models share one metadata; import them so autogenerate sees all tables.
for _module in (
    "ledger.models",
    "ledger.inbox",
    "worker.models",
    "reconciliation.models",
    "webhooks.models",
    "webhooks.review.models",
):
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as exc:
        if exc.name != _module:
            raise

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


def _run(connection: Connection) -> None:
    # Batch mode lets ALTER TABLE work on SQLite, which recreates the table.
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        include_object=compared_with_models(connection.dialect.name),
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
