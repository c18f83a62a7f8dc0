"""The migrations build exactly the schema the models declare, on both backends."""

from __future__ import annotations

import importlib

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from ledger.db import Base
from ledger.migrate import alembic_config
from ledger.models import compared_with_models

for _module in ("ledger.models", "ledger.inbox", "worker.models", "reconciliation.models", "webhooks.review.models"):
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as exc:
        if exc.name != _module:
            raise


class TestMigrations:
    def test_migrated_schema_matches_models(self, engine: Engine) -> None:
        with engine.connect() as conn:
            include = compared_with_models(engine.dialect.name)
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "include_object": include})
            diff = compare_metadata(ctx, Base.metadata)
        assert diff == [], f"migrations and models differ: {diff}"

    def test_every_model_table_exists(self, engine: Engine) -> None:
        tables = set(inspect(engine).get_table_names())
        assert set(Base.metadata.tables) <= tables


class TestAlembicConfig:
    def test_a_url_with_percent_escapes_reaches_alembic_unchanged(self) -> None:
        # A password's "%40" or a socket directory's "%2F": the INI parser's interpolation refused them before.
        url = "postgresql+psycopg://billing:p%40ss@/billing?host=%2Fvar%2Frun%2Fpostgresql"
        assert alembic_config(url).get_main_option("sqlalchemy.url") == url
