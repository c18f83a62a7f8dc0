"""PostgreSQL's consumption in one round trip: the ``ledger_consume`` function created by migration 0001.

The function applies the same rules as :func:`ledger.consume.consume_in_python` (lock the account, replay by
key, access, expire lapsed grants, refuse or draw, record debt, usage, entry, allocations), server-side. Its fast
path covers the common case in three statements, as few as the bare "conditional update + insert with a unique
key" needs plus the grant draw: a conditional ``UPDATE accounts ... WHERE balance + overdraft >= n RETURNING``
(row lock and guard at once), the grant's ``UPDATE`` (which also proves the request id is new), the entry's
``INSERT``. The property tests run the same scenarios through both paths, so they cannot drift apart.

Two ways to run it: :func:`consume` inside a session's transaction (a caller composing a larger unit of work),
and :func:`consume_autocommit` as a transaction of its own, on a pooled connection in autocommit (a lone consumption).
"""

from __future__ import annotations

import json
import threading
import weakref
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.pq import TransactionStatus
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ledger.errors import AccessRefused, IdempotencyConflict, InsufficientCredits, UnknownCustomer
from ledger.models import Account, Grant
from ledger.posting import forget

if TYPE_CHECKING:
    from ledger.consume import ConsumeResult, Consumption

SIGNATURE = "ledger_consume(text, text, text, bigint, text, text, text, timestamptz, jsonb)"
_CALL = (
    "SELECT status, entry_id, balance_after, usage_id, units, available, access_state, request_hash, "
    "grant_ids, grant_units FROM ledger_consume(%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)"
)

_switch = threading.local()
# Per engine: which of the ledger's functions its database has (looked up once each).
_installed: weakref.WeakKeyDictionary[Engine, dict[str, bool]] = weakref.WeakKeyDictionary()


def use_function(flag: bool) -> None:
    """Route this thread's PostgreSQL ledger movements through the functions (default) or the portable Python path."""
    _switch.on = flag


def enabled(session: Session) -> bool:
    """Whether this session's consumption goes through the PostgreSQL function (installed by migration 0001)."""
    return installed(session, SIGNATURE)


def installed(session: Session, signature: str) -> bool:
    """Whether this session's ledger movements go through the PostgreSQL function ``signature``.

    On PostgreSQL, once the migration that creates the function ran, with this thread's switch on.
    """
    if not getattr(_switch, "on", True):
        return False
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    known = _installed.setdefault(engine, {}).get(signature)
    if known is None:
        known = _look_up(engine, signature, session.connection())
    return known


def enabled_for(engine: Engine) -> bool:
    """Whether consumption on ``engine`` goes through the PostgreSQL function (installed by migration 0001)."""
    if not getattr(_switch, "on", True):
        return False
    known = _installed.setdefault(engine, {}).get(SIGNATURE)
    if known is None:
        if engine.dialect.name != "postgresql":
            known = _installed[engine][SIGNATURE] = False
        else:
            with engine.connect() as connection:
                known = _look_up(engine, SIGNATURE, connection)
    return known


def _look_up(engine: Engine, signature: str, connection: Connection) -> bool:
    """Whether the function is installed on ``engine``'s database; remembered per engine."""
    known = engine.dialect.name == "postgresql" and bool(
        connection.exec_driver_sql("SELECT to_regprocedure(%s) IS NOT NULL", (signature,)).scalar()
    )
    _installed.setdefault(engine, {})[signature] = known
    return known


def call(session: Session, sql: str, params: tuple[Any, ...]) -> Any:
    """Run a call of one of the ledger's functions in the session's transaction; its one result row.

    The hot paths talk to psycopg directly (SQLAlchemy's result machinery would cost more CPU than the call);
    errors are wrapped as SQLAlchemy's, like every other statement's.
    """
    driver: Any = session.connection().connection.driver_connection
    try:
        return driver.execute(sql, params, prepare=True).fetchone()
    except psycopg.Error as exc:
        raise DBAPIError.instance(sql, params, exc, psycopg.Error) from exc


def consume(session: Session, request: Consumption) -> ConsumeResult:
    """Consume through ``ledger_consume`` in the session's transaction; its result or the ledger's error."""
    result = _result(call(session, _CALL, _params(request)), request)
    if not result.replayed and session.identity_map:
        forget_moved(session, [g for g, _ in result.funded_by])
    return result


def consume_autocommit(engine: Engine, request: Consumption) -> ConsumeResult:
    """Consume through ``ledger_consume`` as a transaction of its own; committed when it returns.

    A single statement in autocommit is atomic: the function's row locks, checks and writes commit together
    when it ends, or not at all if it fails. So one round trip does what BEGIN, the call and COMMIT do in three,
    with the same outcome, and no session is needed.
    """
    return _result(_call_in_autocommit(engine, _params(request)), request)


def _call_in_autocommit(engine: Engine, params: tuple[Any, ...]) -> Any:
    """The function's row, called on a pooled connection in autocommit; the connection goes back clean."""
    try:
        pooled = engine.raw_connection()
    except psycopg.Error as exc:
        raise DBAPIError.instance(None, None, exc, psycopg.Error) from exc
    driver: Any = pooled.driver_connection
    clean = False
    try:
        # Client-side only (no round trip): a checked-in connection is idle, outside any transaction.
        driver.autocommit = True
        try:
            return driver.execute(_CALL, params, prepare=True).fetchone()
        finally:
            clean = _leave_autocommit(driver)
    except psycopg.Error as exc:
        raise DBAPIError.instance(_CALL, params, exc, psycopg.Error, connection_invalidated=not clean) from exc
    finally:
        if clean:
            pooled.close()
        else:
            # Broken, or interrupted mid-statement: in no state to serve the next unit of work.
            pooled.invalidate()


def _leave_autocommit(driver: Any) -> bool:
    """Switch autocommit off again; False when the connection is not idle and healthy, so cannot be reused."""
    if driver.closed or driver.broken or driver.pgconn.transaction_status != TransactionStatus.IDLE:
        return False
    try:
        driver.autocommit = False
    except psycopg.Error:
        return False
    return True


def _params(request: Consumption) -> tuple[Any, ...]:
    from ledger.consume import consume_key, usage_row

    usage_json = None
    if request.usage is not None:
        row = usage_row(0, request.request_id, request.usage, request.charge, request.now)
        usage_json = json.dumps(row, default=_json_default)
    return (
        request.customer_id, request.request_id, consume_key(request.request_id), request.charge, request.digest,
        request.actor, request.reason, request.now, usage_json,
    )  # fmt: skip


def _result(row: Any, request: Consumption) -> ConsumeResult:
    """The function's row as the ledger's result, or its refusal as the ledger's error."""
    from ledger.consume import ConsumeResult

    customer_id, request_id = request.customer_id, request.request_id
    status, entry_id, balance_after, usage_id, units, available, state, original_hash, grant_ids, grant_units = row
    if status == "unknown_customer":
        raise UnknownCustomer(customer_id)
    if status == "access_refused":
        raise AccessRefused(customer_id, state)
    if status == "insufficient":
        raise InsufficientCredits(customer_id, request.charge, available)
    if status == "replay" and original_hash != request.digest:
        raise IdempotencyConflict(f"request id {request_id!r} was used with other parameters")
    return ConsumeResult(
        request_id=request_id,
        customer_id=customer_id,
        units=units,
        balance_after=balance_after,
        entry_id=entry_id,
        usage_id=usage_id,
        replayed=status == "replay",
        funded_by=tuple(zip(grant_ids, grant_units, strict=True)),
    )


def forget_moved(session: Session, grant_ids: list[int]) -> None:
    """Expire in-session copies of the accounts and of the grants a ledger function changed."""
    for obj in list(session.identity_map.values()):
        if isinstance(obj, Account):
            session.expire(obj)
    forget(session, Grant, grant_ids)


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
