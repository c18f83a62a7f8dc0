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
    from ledger.consume import ConsumeResult
    from ledger.pricing import UsageInput

SIGNATURE = "ledger_consume(text, text, text, bigint, text, text, text, timestamptz, jsonb)"
_CALL = (
    "SELECT status, entry_id, balance_after, usage_id, units, available, access_state, request_hash, "
    "grant_ids, grant_units FROM ledger_consume(%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)"
)

_switch = threading.local()
_installed: weakref.WeakKeyDictionary[Engine, bool] = weakref.WeakKeyDictionary()


def use_function(flag: bool) -> None:
    """Route this thread's PostgreSQL consumption through the function (default) or the portable Python path."""
    _switch.on = flag


def enabled(session: Session) -> bool:
    """Whether this session's consumption goes through the PostgreSQL function (installed by migration 0001)."""
    if not getattr(_switch, "on", True):
        return False
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    known = _installed.get(engine)
    if known is None:
        known = _look_up(engine, session.connection())
    return known


def enabled_for(engine: Engine) -> bool:
    """Whether consumption on ``engine`` goes through the PostgreSQL function (installed by migration 0001)."""
    if not getattr(_switch, "on", True):
        return False
    known = _installed.get(engine)
    if known is None:
        if engine.dialect.name != "postgresql":
            known = _installed[engine] = False
        else:
            with engine.connect() as connection:
                known = _look_up(engine, connection)
    return known


_others: weakref.WeakKeyDictionary[Engine, dict[str, bool]] = weakref.WeakKeyDictionary()


def installed(session: Session, signature: str) -> bool:
    """Whether this session's ledger movements go through the PostgreSQL function ``signature``.

    Only where consumption does (PostgreSQL, the ledger's functions installed, this thread's switch on), and once
    the migration that creates that function ran; remembered per engine.
    """
    if not enabled(session):
        return False
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    known = _others.setdefault(engine, {})
    if signature not in known:
        found = session.connection().exec_driver_sql("SELECT to_regprocedure(%s) IS NOT NULL", (signature,))
        known[signature] = bool(found.scalar())
    return known[signature]


def _look_up(engine: Engine, connection: Connection) -> bool:
    """Whether the function is installed on ``engine``'s database; remembered per engine."""
    known = engine.dialect.name == "postgresql"
    if known:
        found = connection.exec_driver_sql("SELECT to_regprocedure(%s) IS NOT NULL", (SIGNATURE,))
        known = bool(found.scalar())
    _installed[engine] = known
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


def consume(
    session: Session,
    customer_id: str,
    *,
    request_id: str,
    charge: int,
    digest: str,
    usage: UsageInput | None,
    actor: str,
    reason: str,
    now: datetime,
) -> ConsumeResult:
    """Consume through ``ledger_consume`` in the session's transaction; its result or the ledger's error."""
    row = call(session, _CALL, _params(customer_id, request_id, charge, digest, usage, actor, reason, now))
    result = _result(row, customer_id, request_id, charge, digest)
    if not result.replayed and session.identity_map:
        _forget_moved(session, [g for g, _ in result.funded_by])
    return result


def consume_autocommit(
    engine: Engine,
    customer_id: str,
    *,
    request_id: str,
    charge: int,
    digest: str,
    usage: UsageInput | None,
    actor: str,
    reason: str,
    now: datetime,
) -> ConsumeResult:
    """Consume through ``ledger_consume`` as a transaction of its own; committed when it returns.

    A single statement in autocommit is atomic: the function's row locks, checks and writes commit together
    when it ends, or not at all if it fails. So one round trip does what BEGIN, the call and COMMIT do in three,
    with the same outcome, and no session is needed.
    """
    params = _params(customer_id, request_id, charge, digest, usage, actor, reason, now)
    return _result(_call_in_autocommit(engine, params), customer_id, request_id, charge, digest)


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


def _params(
    customer_id: str,
    request_id: str,
    charge: int,
    digest: str,
    usage: UsageInput | None,
    actor: str,
    reason: str,
    now: datetime,
) -> tuple[Any, ...]:
    from ledger.consume import consume_key, usage_row

    usage_json = None
    if usage is not None:
        usage_json = json.dumps(usage_row(0, request_id, usage, charge, now), default=_json_default)
    return (customer_id, request_id, consume_key(request_id), charge, digest, actor, reason, now, usage_json)


def _result(row: Any, customer_id: str, request_id: str, charge: int, digest: str) -> ConsumeResult:
    """The function's row as the ledger's result, or its refusal as the ledger's error."""
    from ledger.consume import ConsumeResult

    status, entry_id, balance_after, usage_id, units, available, state, original_hash, grant_ids, grant_units = row
    if status == "unknown_customer":
        raise UnknownCustomer(customer_id)
    if status == "access_refused":
        raise AccessRefused(customer_id, state)
    if status == "insufficient":
        raise InsufficientCredits(customer_id, charge, available)
    if status == "replay" and original_hash != digest:
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


def _forget_moved(session: Session, grant_ids: list[int]) -> None:
    """Expire in-session copies of the account and the grants the function changed."""
    for obj in list(session.identity_map.values()):
        if isinstance(obj, Account):
            session.expire(obj)
    forget(session, Grant, grant_ids)


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
