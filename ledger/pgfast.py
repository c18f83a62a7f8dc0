"""PostgreSQL's consumption in one round trip: the ``ledger_consume`` function created by migration 0001.

The function applies the same rules as :func:`ledger.consume.consume_in_python` (lock the account, replay by
key, access, expire lapsed grants, refuse or draw, record debt, usage, entry, allocations), server-side. Its fast
path covers the common case in three statements, as few as the bare "conditional update + insert with a unique
key" needs plus the grant draw: a conditional ``UPDATE accounts ... WHERE balance + overdraft >= n RETURNING``
(row lock and guard at once), the grant's ``UPDATE`` (which also proves the request id is new), the entry's
``INSERT``. The property tests run the same scenarios through both paths, so they cannot drift apart.
"""

from __future__ import annotations

import json
import threading
import weakref
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from sqlalchemy import Engine
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
        known = engine.dialect.name == "postgresql"
        if known:
            found = session.connection().exec_driver_sql("SELECT to_regprocedure(%s) IS NOT NULL", (SIGNATURE,))
            known = bool(found.scalar())
        _installed[engine] = known
    return known


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
    """Consume through ``ledger_consume``; translate its status into the ledger's result or error."""
    from ledger.consume import ConsumeResult, consume_key, usage_row

    usage_json = None
    if usage is not None:
        row = usage_row(0, request_id, usage, charge, now)
        usage_json = json.dumps(row, default=_json_default)
    params = (customer_id, request_id, consume_key(request_id), charge, digest, actor, reason, now, usage_json)
    # The hot path talks to psycopg directly (SQLAlchemy's result machinery would cost more CPU than the call),
    # inside the session's own transaction; errors are wrapped as SQLAlchemy's, like every other statement.
    connection = session.connection()
    driver: Any = connection.connection.driver_connection
    try:
        row = driver.execute(_CALL, params, prepare=True).fetchone()
    except psycopg.Error as exc:
        raise DBAPIError.instance(_CALL, params, exc, psycopg.Error) from exc
    status, entry_id, balance_after, usage_id, units, available, state, original_hash, grant_ids, grant_units = row
    if status == "unknown_customer":
        raise UnknownCustomer(customer_id)
    if status == "access_refused":
        raise AccessRefused(customer_id, state)
    if status == "insufficient":
        raise InsufficientCredits(customer_id, charge, available)
    if status == "replay" and original_hash != digest:
        raise IdempotencyConflict(f"request id {request_id!r} was used with other parameters")
    if status == "ok" and session.identity_map:
        _forget_moved(session, grant_ids)
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
