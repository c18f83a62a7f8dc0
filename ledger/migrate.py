"""Apply the schema migrations (Alembic) to the configured database."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ledger.db import get_engine

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for this project's migrations, with no ini file needed."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url:
        # The config is an INI parser with %-interpolation: a URL's percent-escapes (a password's "%40", a socket
        # directory's "%2F") would be read as interpolations and refused.
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine | None = None, revision: str = "head") -> None:
    """Upgrade the database behind ``engine`` (default: the configured one) to ``revision``."""
    engine = engine or get_engine()
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        if revision == "head":
            # PostgreSQL's ledger functions read the access policy from the database: write the config's.
            from ledger.access import sync_access_policy

            with Session(bind=conn) as session:
                sync_access_policy(session)


class DatabaseNotReady(Exception):
    """The database cannot serve this code: never migrated, behind, or ahead of it. The message says what to do."""

    code = "database_not_ready"


def schema_problem(engine: Engine | None = None) -> str | None:
    """None when the database is at this code's migration head; otherwise one line naming the problem and the fix."""
    engine = engine or get_engine()
    url = engine.url
    shown = url.render_as_string(hide_password=True)
    # Connecting would create a SQLite file: an absent file is simply an empty database.
    sqlite_file = url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:"
    if sqlite_file and url.database and not Path(url.database).exists():
        return _empty(shown, url.database)
    # Alembic announces its dialect at INFO on every configure(): noise for a check that runs before commands.
    alembic_log = logging.getLogger("alembic.runtime.migration")
    level = alembic_log.level
    alembic_log.setLevel(logging.WARNING)
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    finally:
        alembic_log.setLevel(level)
    script = ScriptDirectory.from_config(alembic_config())
    heads = set(script.get_heads())
    if current == heads:
        return None
    if not current:
        return _empty(shown, url.database)
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = sorted(current - known)
    if unknown:
        return (
            f"the database at {shown} was migrated by a newer billing-reconciler (revision {', '.join(unknown)} "
            "is unknown here): upgrade this installation, or point DATABASE_URL at another database"
        )
    return (
        f"the database at {shown} is behind this version (at {', '.join(sorted(current))}, needs "
        f"{', '.join(sorted(heads))}): run `billing-reconciler migrate`"
    )


def _empty(shown: str, database: str | None) -> str:
    hint = ""
    if database and database.endswith("billing.db"):
        # The embedded default: the user may have meant the demo's database (its own file in its work directory).
        hint = "; to look at the demo's data, export the DATABASE_URL that `billing-reconciler demo` printed"
    return f"the database at {shown} is empty (never migrated): run `billing-reconciler migrate` first{hint}"


def require_current_schema(engine: Engine | None = None) -> None:
    """Raise DatabaseNotReady unless the database is at this code's migration head."""
    problem = schema_problem(engine)
    if problem is not None:
        raise DatabaseNotReady(problem)
