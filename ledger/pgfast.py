"""PostgreSQL's backend of the ledger: its functions, each one round trip (``ledger_consume``, migration 0001;
``ledger_consume_many``, migration 0008; the grant and movement functions, 0006 and 0007).

``ledger_consume`` applies the same rules as :func:`ledger.portable.consume` (lock the account, replay by
key, access, expire lapsed grants, refuse or draw, record debt, usage, entry, allocations), server-side. Its fast
path covers the common case in three statements, as few as the bare "conditional update + insert with a unique
key" needs plus the grant draw: a conditional ``UPDATE accounts ... WHERE balance + overdraft >= n RETURNING``
(row lock and guard at once), the grant's ``UPDATE`` (which also proves the request id is new), the entry's
``INSERT``. The property tests run the same scenarios through both paths, so they cannot drift apart.

Ways to run it: :func:`consume` inside a session's transaction (a caller composing a larger unit of work), and
:func:`consume_many_autocommit` as a transaction of its own on a pooled connection in autocommit: one
``ledger_consume`` call for a lone consumption, one ``ledger_consume_many`` call for a batch.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ledger.access import describe_refusal
from ledger.consumption import ConsumeOutcome, ConsumeResult, Consumption, key_taken, usage_row
from ledger.errors import (
    AccessRefused,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    LedgerError,
    UnknownCustomer,
)
from ledger.models import Account, Grant
from ledger.posting import forget

SIGNATURE = "ledger_consume(text, text, text, bigint, text, text, text, timestamptz, jsonb)"
_CALL = (
    "SELECT status, entry_id, balance_after, usage_id, units, available, access_state, request_hash, "
    "grant_ids, grant_units FROM ledger_consume(%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)"
)
# The form that also takes the request's limit rows (migration 0016): limits reserved in the same statement.
LIMITED_SIGNATURE = "ledger_consume(text, text, text, bigint, text, text, text, timestamptz, jsonb, jsonb)"
_CALL_LIMITED = (
    "SELECT status, entry_id, balance_after, usage_id, units, available, access_state, request_hash, "
    "grant_ids, grant_units, limit_name, limit_used "
    "FROM ledger_consume(%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb)"
)
# What a refusal by a limit is, given the refused limit's name and what its counter held (ledger.limits builds it).
LimitRefusal = Callable[[str, int], LedgerError]
# The batch calls take their arrays as array literals (see _many_params), each cast to its type.
# Its items' limit rows are json (migration limits_3), read only by its item-by-item path; the set-wise path takes
# the batch's sums per counter as arrays (migration limits_4, summed here: see _counter_sums).
MANY_LIMITED_SIGNATURE = (
    "ledger_consume_many(text[], text[], text[], bigint[], text[], text[], text[], timestamptz[], jsonb[], json, "
    "text[], text[], text[], timestamptz[], text[], bigint[], bigint[], bigint[], bigint[], bigint[])"
)
_CALL_MANY_LIMITED = (
    "SELECT idx, status, entry_id, balance_after, usage_id, units, available, access_state, request_hash, "
    "grant_ids, grant_units, limit_name, limit_used "
    "FROM ledger_consume_many("
    "%s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], "
    "%s::jsonb[], %s::json, %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::text[], %s::bigint[], "
    "%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[])"
)
# One counter a consumption takes: limit name, scope value, window start (ISO), measure, maximum, and what the
# consumption adds to it: requests, units, tokens, cost (10^-10 USD). Integers as the counter stores them.
CounterRow = tuple[str, str, str, str, int, int, int, int, int]
# A consumption's limit rows (PreparedLimits.as_json, None when no limit applies), its refusal's error, and its
# counters (PreparedLimits.counter_rows).
Limited = tuple[str | None, "LimitRefusal | None", tuple[CounterRow, ...]]
MANY_SIGNATURE = "ledger_consume_many(text[], text[], text[], bigint[], text[], text[], text[], timestamptz[], jsonb[])"
_CALL_MANY = (
    "SELECT idx, status, entry_id, balance_after, usage_id, units, available, access_state, request_hash, "
    "grant_ids, grant_units FROM ledger_consume_many("
    "%s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], "
    "%s::jsonb[])"
)

# The errors one item of a batch can cause; each item then runs alone (see consume_many_autocommit).
_ONE_ITEM_REFUSED = (
    psycopg.errors.UniqueViolation,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DataError,
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
    return installed_for(engine, SIGNATURE)


def installed_for(engine: Engine, signature: str) -> bool:
    """Whether ``engine``'s ledger movements go through the PostgreSQL function ``signature`` (see installed)."""
    if not getattr(_switch, "on", True):
        return False
    known = _installed.setdefault(engine, {}).get(signature)
    if known is None:
        if engine.dialect.name != "postgresql":
            known = _installed[engine][signature] = False
        else:
            with engine.connect() as connection:
                known = _look_up(engine, signature, connection)
    return known


def known_installed(engine: Engine, signature: str) -> bool | None:
    """:func:`installed_for` without a round trip: None while ``engine``'s database was not asked yet."""
    if not getattr(_switch, "on", True):
        return False
    if engine.dialect.name != "postgresql":
        return False
    return _installed.get(engine, {}).get(signature)


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


def call_autocommit(engine: Engine, sql: str, params: tuple[Any, ...]) -> Any:
    """Run a call of one of the ledger's functions as a transaction of its own (see consume_many_autocommit)."""
    (row,) = _in_autocommit(engine, sql, params)
    return row


def consume(session: Session, request: Consumption) -> ConsumeResult:
    """Consume through ``ledger_consume`` in the session's transaction; its result or the ledger's error."""
    result = _result(call(session, _CALL, _params(request)), request)
    if not result.replayed and session.identity_map:
        forget_moved(session, [g for g, _ in result.funded_by])
    return result


def consume_limited(
    session: Session, request: Consumption, limit_rows: str | None, refusal: LimitRefusal | None
) -> ConsumeResult:
    """Consume and take the request's limit room (``limit_rows``) in one ``ledger_consume`` call, in the
    session's transaction; a limit's refusal is ``refusal``'s error, with nothing written."""
    row = call(session, _CALL_LIMITED, (*_params(request), limit_rows))
    result = _result(row, request, refusal)
    if not result.replayed and session.identity_map:
        forget_moved(session, [g for g, _ in result.funded_by])
    return result


def consume_many_autocommit(
    engine: Engine, requests: Sequence[Consumption], limited: Sequence[Limited] | None = None
) -> list[ConsumeOutcome]:
    """Apply consumptions as one transaction of their own; one outcome per request, in order, committed.

    A single statement in autocommit is atomic: the function's row locks, checks and writes commit together
    when it ends, or not at all if it fails. So one round trip does what BEGIN, the call and COMMIT do in three,
    with the same outcome, and no session is needed. A batch is one ``ledger_consume_many`` call, which locks
    its accounts in one order (customer id), so concurrent batches cannot deadlock each other.

    ``limited`` (one per request) gives each consumption's limit rows: each is then taken in its consumption's
    statement (``ledger_consume`` with limits, ``ledger_consume_many`` with limits, migration 0016).
    """
    many = MANY_SIGNATURE if limited is None else MANY_LIMITED_SIGNATURE
    limits_of: Sequence[Limited | None] = limited if limited is not None else [None] * len(requests)
    if len(requests) == 1:
        return [_alone(engine, requests[0], limits_of[0])]
    if not installed_for(engine, many):  # a database migrated before 0008
        return [_alone(engine, request, rows) for request, rows in zip(requests, limits_of, strict=True)]
    batch, after = _split_cross_customer_repeats(requests)
    outcomes: dict[int, ConsumeOutcome] = {}
    if len(batch) == 1:
        outcomes[batch[0]] = _alone(engine, requests[batch[0]], limits_of[batch[0]])
    elif batch:
        chosen = [requests[i] for i in batch]
        try:
            if limited is None:
                rows = _in_autocommit(engine, _CALL_MANY, _many_params(chosen))
            else:
                # One JSON array of the items' rows (see migration 0016): no per-element array quoting.
                limit_rows = "[" + ",".join(limited[i][0] or "null" for i in batch) + "]"
                sums = _counter_sums(chosen, [limited[i][2] for i in batch])
                rows = _in_autocommit(engine, _CALL_MANY_LIMITED, (*_many_params(chosen), limit_rows, *sums))
        except DBAPIError as exc:
            if exc.connection_invalidated or not isinstance(exc.orig, _ONE_ITEM_REFUSED):
                raise
            # The database refused one item (a unique-key race with another customer's request id, a deadlock
            # with a transaction that locks accounts in another order, a value out of a column's range): each
            # alone, so it cannot fail the rest. Anything else is a fault, not an item's doing: raised.
            rows = None
        if rows is None:
            for i in batch:
                outcomes[i] = _alone(engine, requests[i], limits_of[i])
        else:
            for row in rows:
                position = batch[row[0] - 1]
                outcomes[position] = _outcome(row[1:], requests[position], limits_of[position])
    for i in after:
        outcomes[i] = _alone(engine, requests[i], limits_of[i])
    return [outcomes[i] for i in range(len(requests))]


def _split_cross_customer_repeats(requests: Sequence[Consumption]) -> tuple[list[int], list[int]]:
    """Positions to apply in the batch call, and those to apply one by one after it, in order.

    The function applies a batch grouped by customer, each customer's items in their order. Items of different
    customers meet only through a request id, so that equals applying the items one by one, except when two
    customers use one request id: then the first use must come first, as it would one by one. So a use of an
    id another customer used first in this batch waits for the batch, and so does everything after it of its
    customer (keeping the customer's order), and so does any later use of an id any earlier use of which waits
    (a suspended customer's refused use, another customer's, then the first customer's again: the last must see
    the second, a conflict).
    """
    first_use: dict[str, str] = {}  # request id -> customer of its first use
    waiting: set[str] = set()  # customers whose remaining items wait for the batch
    waiting_ids: set[str] = set()  # request ids whose remaining uses wait for the batch
    batch: list[int] = []
    after: list[int] = []
    for position, request in enumerate(requests):
        owner = first_use.setdefault(request.request_id, request.customer_id)
        if (
            request.customer_id not in waiting
            and request.request_id not in waiting_ids
            and owner == request.customer_id
        ):
            batch.append(position)
        else:
            waiting.add(request.customer_id)
            waiting_ids.add(request.request_id)
            after.append(position)
    return batch, after


def _alone(engine: Engine, request: Consumption, limited: Limited | None = None) -> ConsumeOutcome:
    """One consumption as its own statement (taking its limits' room when ``limited``); a refusal is its outcome."""
    try:
        if limited is None:
            (row,) = _in_autocommit(engine, _CALL, _params(request))
        else:
            (row,) = _in_autocommit(engine, _CALL_LIMITED, (*_params(request), limited[0]))
    except DBAPIError as exc:
        refusal = refused_request(exc, request.request_id)
        if refusal is None:
            raise
        return refusal
    return _outcome(row, request, limited)


def refused_request(exc: DBAPIError, request_id: str) -> LedgerError | None:
    """The ledger's error for a keyed write (consumption, hold, capture) the database refused for its input, or None.

    A unique-key violation on the request's key means another customer's request with the same id committed
    first: a conflict. A value out of a column's range is an invalid request.
    """
    orig = exc.orig
    if isinstance(orig, psycopg.errors.UniqueViolation):
        return key_taken(orig, request_id)
    if isinstance(orig, psycopg.errors.DataError):
        return InvalidRequest(f"a value of request {request_id!r} is out of range")
    return None


def _in_autocommit(engine: Engine, sql: str, params: tuple[Any, ...]) -> list[Any]:
    """The statement's rows, run on a pooled connection in autocommit; the connection goes back clean."""
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
            return driver.execute(sql, params, prepare=True).fetchall()
        finally:
            clean = _leave_autocommit(driver)
    except psycopg.Error as exc:
        raise DBAPIError.instance(sql, params, exc, psycopg.Error, connection_invalidated=not clean) from exc
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


def _usage_json(request: Consumption) -> str | None:
    if request.usage is None:
        return None
    row = usage_row(0, request.request_id, request.usage, request.charge, request.now)
    return json.dumps(row, default=_json_default)


def _params(request: Consumption) -> tuple[Any, ...]:
    return (
        request.customer_id, request.request_id, request.key, request.charge, request.digest,
        request.actor, request.reason, request.now, _usage_json(request),
    )  # fmt: skip


def _many_params(requests: Sequence[Consumption]) -> tuple[str, ...]:
    """The batch's columns as PostgreSQL array literals.

    psycopg adapts a list element by element in Python (~2 µs each: 9 columns of up to 1,000 items made it the
    batch path's largest cost in py-spy); a literal is one string built by ``join``, parsed by the server in C.
    """
    return (
        array_literal([r.customer_id for r in requests]), array_literal([r.request_id for r in requests]),
        array_literal([r.key for r in requests]), "{" + ",".join([str(r.charge) for r in requests]) + "}",
        array_literal([r.digest for r in requests]), array_literal([r.actor for r in requests]),
        array_literal([r.reason for r in requests]), array_literal([r.now.isoformat() for r in requests]),
        array_literal([_usage_json(r) for r in requests]),
    )  # fmt: skip


def _counter_sums(requests: Sequence[Consumption], counters: Sequence[tuple[CounterRow, ...]]) -> tuple[str, ...]:
    """The batch's counters, each once with its customer and the sums of what its items add, as array literals.

    The set-wise path adds these in one guarded UPDATE (migration limits_4). A counter is one customer's (its
    scope value starts with the customer id), so its items are that customer's.
    """
    sums: dict[tuple[str, str, str], list[Any]] = {}
    for request, rows in zip(requests, counters, strict=True):
        for name, scope, start, measure, maximum, requests_, units, tokens, cost in rows:
            total = sums.get((name, scope, start))
            if total is None:
                sums[(name, scope, start)] = [request.customer_id, measure, maximum, requests_, units, tokens, cost]
            else:
                total[3] += requests_
                total[4] += units
                total[5] += tokens
                total[6] += cost
    keys, totals = list(sums), list(sums.values())
    return (
        array_literal([t[0] for t in totals]), array_literal([k[0] for k in keys]),
        array_literal([k[1] for k in keys]), array_literal([k[2] for k in keys]),
        array_literal([t[1] for t in totals]),
        *("{" + ",".join([str(t[column]) for t in totals]) + "}" for column in (2, 3, 4, 5, 6)),
    )  # fmt: skip


def array_literal(values: Sequence[str | None]) -> str:
    """A PostgreSQL array literal of ``values``: each element quoted and escaped, None as NULL."""
    return (
        "{"
        + ",".join("NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
        + "}"
    )


def _outcome(row: Any, request: Consumption, limited: Limited | None = None) -> ConsumeOutcome:
    """The function's row as the ledger's result, or its refusal as the ledger's error (returned, not raised)."""
    try:
        return _result(row, request, limited[1] if limited is not None else None)
    except LedgerError as exc:
        return exc


def _result(row: Any, request: Consumption, refusal: LimitRefusal | None = None) -> ConsumeResult:
    """The function's row as the ledger's result, or its refusal as the ledger's error."""
    customer_id, request_id = request.customer_id, request.request_id
    status, entry_id, balance_after, usage_id, units, available, state, original_hash, grant_ids, grant_units = row[:10]
    if status == "limit_exceeded" and refusal is not None:
        raise refusal(row[10], row[11])
    if status == "unknown_customer":
        raise UnknownCustomer(customer_id)
    if status == "access_refused":
        raise AccessRefused(customer_id, state, describe_refusal(state))
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
