"""Test fixtures shared by the whole suite.

Every test that takes ``engine`` (or ``session``) runs twice: on the embedded SQLite default and on the
PostgreSQL named by ``DATABASE_URL``. Tests marked ``postgres`` take ``pg_engine`` and run on PostgreSQL only.
When ``DATABASE_URL`` names a PostgreSQL server that does not answer, those tests fail; they are skipped (and
said so) only when no PostgreSQL URL is given at all, and never under CI.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from ledger import db
from ledger.config import get_billing_config
from ledger.migrate import migrate
from ledger.settings import get_settings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STRIPE_EVENTS = SHARED / "fixtures" / "stripe" / "events"
PROVIDER_FIXTURES = SHARED / "fixtures" / "providers"

IN_CI = bool(os.environ.get("CI"))


def postgres_url() -> str | None:
    """The PostgreSQL URL the suite runs against, or None when none is configured."""
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith("postgresql"):
        return url
    if IN_CI:
        raise pytest.UsageError("CI must set DATABASE_URL to a PostgreSQL database")
    return None


def redis_url() -> str | None:
    """The Redis broker URL for tests that need a real broker, or None when none is configured."""
    url = os.environ.get("CELERY_BROKER_URL", "")
    if url.startswith("redis"):
        return url
    if IN_CI:
        raise pytest.UsageError("CI must set CELERY_BROKER_URL to a Redis broker")
    return None


# --- what the run covers: said at the start and in the summary -----------------------------------------------

NO_POSTGRES = "no PostgreSQL configured"
NO_REDIS = "no Redis"


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say up front which databases and broker this run uses."""
    if postgres_url() is None:
        databases = (
            "databases: SQLite only; tests that need PostgreSQL will be SKIPPED "
            "(set DATABASE_URL=postgresql+psycopg://... to run them)"
        )
    else:
        databases = "databases: SQLite and PostgreSQL (DATABASE_URL)"
    broker = "broker: Redis (CELERY_BROKER_URL)" if redis_url() else "broker: none; Redis tests will be SKIPPED"
    return [databases, broker]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> Iterator[None]:
    """End with one line counting the tests skipped for want of PostgreSQL or Redis: they did not pass."""
    yield  # after pytest's own summaries, just above the final count
    skipped = terminalreporter.stats.get("skipped", [])
    no_pg = sum(1 for report in skipped if NO_POSTGRES in str(report.longrepr))
    no_redis = sum(1 for report in skipped if NO_REDIS in str(report.longrepr))
    if no_pg or no_redis:
        parts = []
        if no_pg:
            parts.append(f"{no_pg} need PostgreSQL (set DATABASE_URL=postgresql+psycopg://...)")
        if no_redis:
            parts.append(f"{no_redis} need Redis (set CELERY_BROKER_URL=redis://...)")
        terminalreporter.write_sep("=", "NOT RUN: " + "; ".join(parts), yellow=True, bold=True)


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test reads settings and billing config afresh, so monkeypatched env vars take effect."""
    get_settings.cache_clear()
    get_billing_config.cache_clear()
    yield
    get_settings.cache_clear()
    get_billing_config.cache_clear()


# --- SQLite: migrate once into a template file, copy it for each test. ---------------------------------------


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    engine = db.make_engine(f"sqlite:///{path}")
    migrate(engine)
    engine.dispose()
    return path


def _sqlite_engine(template: Path, tmp_path: Path) -> Engine:
    path = tmp_path / "billing.db"
    shutil.copyfile(template, path)
    return db.make_engine(f"sqlite:///{path}")


# --- PostgreSQL: migrate once per session, truncate every table before each test. -------------------------


@pytest.fixture(scope="session")
def _pg_migrated() -> Iterator[Engine]:
    url = postgres_url()
    if url is None:
        pytest.skip("no PostgreSQL configured: set DATABASE_URL=postgresql+psycopg://... to run these")
    engine = db.make_engine(url, pool_size=40, max_overflow=40)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # the server named by DATABASE_URL must answer: fail, never skip
        pytest.fail(f"PostgreSQL at DATABASE_URL does not answer: {exc}", pytrace=False)
    migrate(engine)
    yield engine
    engine.dispose()


def _truncate_all(engine: Engine) -> None:
    tables = [t.name for t in db.Base.metadata.sorted_tables]
    with engine.begin() as conn:
        existing = {
            row[0] for row in conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"))
        }
        names = ", ".join(f'"{t}"' for t in tables if t in existing)
        if names:
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


@pytest.fixture
def pg_engine(_pg_migrated: Engine) -> Iterator[Engine]:
    """A clean, migrated PostgreSQL database, installed as the process-wide engine."""
    _truncate_all(_pg_migrated)
    db.set_engine(_pg_migrated)
    yield _pg_migrated
    db._engine = None  # the session-scoped engine outlives this test; do not dispose it here
    db._factory = None


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A clean, migrated database on each backend, installed as the process-wide engine."""
    if request.param == "sqlite":
        eng = _sqlite_engine(request.getfixturevalue("_sqlite_template"), tmp_path)
        db.set_engine(eng)
        yield eng
        db.set_engine(None)
    else:
        yield request.getfixturevalue("pg_engine")


@pytest.fixture
def sqlite_engine(_sqlite_template: Path, tmp_path: Path) -> Iterator[Engine]:
    """A clean, migrated SQLite database (the embedded default), installed as the process-wide engine."""
    eng = _sqlite_engine(_sqlite_template, tmp_path)
    db.set_engine(eng)
    yield eng
    db.set_engine(None)


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """A session on the test database; the test commits what it wants others to see."""
    with Session(engine, expire_on_commit=False) as s:
        yield s


@pytest.fixture
def stripe_event_files() -> list[Path]:
    """Every shared Stripe event fixture file."""
    files = sorted(STRIPE_EVENTS.glob("*.json"))
    assert files, f"no Stripe fixtures under {STRIPE_EVENTS}"
    return files


@pytest.fixture
def billing_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    """Write a billing config file and point BILLING_CONFIG at it."""

    def write(body: str) -> Path:
        path = tmp_path / "billing.toml"
        path.write_text(body, encoding="utf-8")
        monkeypatch.setenv("BILLING_CONFIG", str(path))
        get_settings.cache_clear()
        get_billing_config.cache_clear()
        return path

    return write
