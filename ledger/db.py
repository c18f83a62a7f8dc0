"""Engine, sessions and the unit of work.

Only the edges (a CLI command, an HTTP request, a Celery task) open a unit of work; domain functions take the
session they are given and never commit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import BigInteger, Engine, Integer, MetaData, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import NullPool

from ledger.settings import get_settings

# Named constraints, so migrations are stable across PostgreSQL and SQLite.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT on PostgreSQL; INTEGER on SQLite, where only INTEGER PRIMARY KEY autoincrements.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base shared by every package's models."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def is_sqlite(engine_or_session: Engine | Session) -> bool:
    """True when running on the embedded SQLite default."""
    bind = engine_or_session.get_bind() if isinstance(engine_or_session, Session) else engine_or_session
    return bind.dialect.name == "sqlite"


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite's own transaction handling defers BEGIN and so lets two writers deadlock on lock upgrade.
    # Take the write lock up front (BEGIN IMMEDIATE) and wait for it instead of failing.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """Create an engine for ``url`` (default: settings), tuned for the backend."""
    settings = get_settings()
    url = url or settings.database_url
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        kwargs.setdefault("poolclass", NullPool)
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine)
        return engine
    if "connect_timeout" not in url:
        # libpq waits for the OS's TCP timeout (minutes) on a host that drops packets: fail in seconds instead.
        kwargs.setdefault("connect_args", {"connect_timeout": 10})
    kwargs.setdefault("pool_size", settings.database_pool_size)
    kwargs.setdefault("max_overflow", settings.database_pool_size)
    kwargs.setdefault("pool_pre_ping", settings.database_pool_pre_ping)
    kwargs.setdefault("pool_recycle", settings.database_pool_recycle_seconds)
    return create_engine(url, **kwargs)


_lock = threading.Lock()
_engine: Engine | None = None
_factory: sessionmaker[Session] | None = None
_first_use_check: Callable[[Engine], None] | None = None


def check_on_first_use(check: Callable[[Engine], None] | None) -> None:
    """Run ``check`` on the process-wide engine when it is first created (the CLI: is the database usable?).

    The engine is kept only if the check passes; commands that never touch the database never pay for it.
    """
    global _first_use_check
    with _lock:
        _first_use_check = check


def get_engine() -> Engine:
    """The process-wide engine, created on first use."""
    global _engine, _factory, _first_use_check
    with _lock:
        if _engine is None:
            engine = make_engine()
            if _first_use_check is not None:
                try:
                    _first_use_check(engine)
                except BaseException:
                    engine.dispose()
                    raise
                _first_use_check = None
            _engine = engine
            _factory = sessionmaker(_engine, expire_on_commit=False)
        return _engine


def set_engine(engine: Engine | None) -> None:
    """Replace the process-wide engine (tests, benchmarks, forked workers)."""
    global _engine, _factory
    with _lock:
        if _engine is not None and _engine is not engine:
            _engine.dispose()
        _engine = engine
        _factory = sessionmaker(engine, expire_on_commit=False) if engine is not None else None


def session_factory() -> sessionmaker[Session]:
    """The sessionmaker bound to the process-wide engine."""
    get_engine()
    assert _factory is not None
    return _factory


@contextmanager
def unit_of_work() -> Iterator[Session]:
    """One transaction: commit when the block ends, roll back if it raises."""
    with session_factory().begin() as session:
        yield session


def describe_connection_error(exc: BaseException, url: str | None = None) -> str | None:
    """One line naming why the database cannot be used and the fix, or None when ``exc`` is not a connection error.

    The driver's own messages run to several lines (libpq adds hints per address tried); a person needs the
    cause and what to change.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, InterfaceError, NoSuchModuleError, OperationalError

    raw = url or get_settings().database_url
    if isinstance(exc, ArgumentError | NoSuchModuleError):
        return (
            f"DATABASE_URL {raw.split('://')[0]}://... is not a database URL this project reads ({exc}): use "
            "postgresql+psycopg://user:password@host:5432/dbname or sqlite:///path/to/billing.db"
        )
    if not isinstance(exc, OperationalError | InterfaceError):
        return None
    try:
        parsed = make_url(raw)
    except ArgumentError:
        return None
    shown = parsed.render_as_string(hide_password=True)
    text = str(getattr(exc, "orig", None) or exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    if parsed.get_backend_name() == "sqlite":
        return (
            f"cannot open the SQLite database {parsed.database} ({first}): its directory must exist and be "
            "writable; fix DATABASE_URL"
        )
    host, port = parsed.host or "localhost", parsed.port or 5432
    where = f"{host}:{port}"
    if "does not exist" in text and "database" in text:
        return (
            f'database "{parsed.database}" does not exist on {where}: create it (createdb -h {host} -p {port} '
            f"-U {parsed.username or 'postgres'} {parsed.database}) or fix DATABASE_URL"
        )
    if "password authentication failed" in text or "no password supplied" in text:
        return f"PostgreSQL at {where} refused the user or password in DATABASE_URL ({shown}): fix DATABASE_URL"
    reason = "connection refused" if "refused" in text else first.split(": ")[-1]
    return f"cannot reach PostgreSQL at {where} ({reason}): start the server or fix DATABASE_URL ({shown})"
