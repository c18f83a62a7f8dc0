"""Posting: the one place where units move between accounts, grants and entries.

Every movement follows the same discipline, whatever asked for it (consume, hold, capture, clawback, expiry):

1. lock the account row (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already holds
   the database's write lock), so concurrent movements on one account are serialized and never read-then-write;
2. change grants, append entries (each with its ``balance_after``) and allocations;
3. write the account's projection (balance, held, debt) once.

So ``balance == sum(entries.units) == sum(grants.remaining) - debt`` holds after every unit of work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import CursorResult, Executable, Table, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ledger.access import policy_key, refusal_reason, spendable_sources
from ledger.errors import AccessRefused, InvalidRequest, UnknownCustomer
from ledger.models import AccessState, Account, Allocation, Entry, EntryKind, Grant

ACCOUNTS: Table = Account.__table__  # type: ignore[assignment]
GRANTS: Table = Grant.__table__  # type: ignore[assignment]
ENTRIES: Table = Entry.__table__  # type: ignore[assignment]
ALLOCATIONS: Table = Allocation.__table__  # type: ignore[assignment]

T = TypeVar("T")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """``value`` in UTC; SQLite hands back naive datetimes, which we always stored as UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def request_hash(**params: Any) -> str:
    """A stable digest of a request's parameters, to tell a retry from a reused key."""
    body = json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def charge_hash(customer_id: str, units: int | None, reason: str) -> str:
    """``request_hash(customer_id=, units=, usage=None, reason=)``, written out directly for a plain charge.

    The same sorted, compact, ASCII-escaped JSON json.dumps writes (a property test holds the two together): the
    batch endpoint digests every item, and json.dumps was 3.4 µs of an item's ~15 µs of Python.
    """
    shown = "null" if units is None else str(units)
    body = f'{{"customer_id":{_json_string(customer_id)},"reason":{_json_string(reason)},"units":{shown},"usage":null}}'
    return hashlib.sha256(body.encode()).hexdigest()


_json_string = json.encoder.encode_basestring_ascii  # what json.dumps writes a str as (ensure_ascii)


def run(session: Session, statement: Executable, params: Any = None) -> CursorResult[Any]:
    """Execute a Core statement on the session's connection, without the ORM layer.

    The ledger writes its tables with Core only, so no ORM flush is owed before these statements; the hot
    paths pass statements built once at import (below), which spares building and cache-keying them per call.
    """
    return session.connection().execute(statement, params)


# The backends the ledger runs on, by SQLAlchemy dialect name: their INSERT supports ON CONFLICT.
BACKENDS: dict[str, Any] = {"postgresql": postgresql, "sqlite": sqlite}


def for_each_backend(build: Callable[[Any], T]) -> dict[str, T]:
    """``build`` applied to each backend's dialect module: an ON CONFLICT statement built once per backend."""
    return {name: build(dialect) for name, dialect in BACKENDS.items()}


def upsert(session: Session, table: Table) -> Any:
    """An INSERT that supports ``on_conflict_do_nothing`` on the session's backend."""
    return BACKENDS.get(session.get_bind().dialect.name, sqlite).insert(table)


def require_positive(name: str, value: int, *, allow_zero: bool = False) -> None:
    """Refuse a non-integer or negative amount."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"{name} must be an integer, not {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidRequest(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def require_key(name: str, value: str) -> None:
    """Refuse an empty or oversized idempotency key."""
    if not isinstance(value, str) or not value or len(value) > 200:
        raise InvalidRequest(f"{name} must be a non-empty string of at most 200 characters")


@dataclass
class LockedAccount:
    """The account row, locked for this transaction; movements update it in memory, ``save`` writes it."""

    id: int
    customer_id: str
    balance: int
    held: int
    debt: int
    overdraft_limit: int
    access_state: AccessState
    grace_until: datetime | None
    moved_grants: set[int] = field(default_factory=set)

    @property
    def available(self) -> int:
        """What consumption may take now (the balance plus the overdraft still unused)."""
        return max(0, self.balance + self.overdraft_limit)


ACCOUNT_COLUMNS = (
    ACCOUNTS.c.id,
    ACCOUNTS.c.customer_id,
    ACCOUNTS.c.balance,
    ACCOUNTS.c.held,
    ACCOUNTS.c.debt,
    ACCOUNTS.c.overdraft_limit,
    ACCOUNTS.c.access_state,
    ACCOUNTS.c.grace_until,
)


def locked_account(row: Any) -> LockedAccount:
    """The account as a row of :data:`ACCOUNT_COLUMNS` reads, to move units on under its lock."""
    return LockedAccount(
        id=row.id,
        customer_id=row.customer_id,
        balance=row.balance,
        held=row.held,
        debt=row.debt,
        overdraft_limit=row.overdraft_limit,
        access_state=AccessState(row.access_state),
        grace_until=as_utc(row.grace_until),
    )


_LOCK_BY_CUSTOMER = (
    select(*ACCOUNT_COLUMNS).where(ACCOUNTS.c.customer_id == bindparam("customer_id")).with_for_update(key_share=True)
)
_LOCK_BY_ID = select(*ACCOUNT_COLUMNS).where(ACCOUNTS.c.id == bindparam("account_id")).with_for_update(key_share=True)
_SAVE_ACCOUNT = (
    update(ACCOUNTS)
    .where(ACCOUNTS.c.id == bindparam("account_id"))
    .values(
        balance=bindparam("new_balance"),
        held=bindparam("new_held"),
        debt=bindparam("new_debt"),
        updated_at=bindparam("now"),
    )
)
_INSERT_ENTRY = insert(ENTRIES).returning(ENTRIES.c.id)
_INSERT_ALLOCATION = insert(ALLOCATIONS)
_MOVE_GRANT_UNITS = (
    update(GRANTS).where(GRANTS.c.id == bindparam("gid")).values(remaining=GRANTS.c.remaining + bindparam("delta"))
)


def lock_account(session: Session, customer_id: str) -> LockedAccount:
    """Lock and read the account of ``customer_id``; raise UnknownCustomer."""
    row = run(session, _LOCK_BY_CUSTOMER, {"customer_id": customer_id}).one_or_none()
    if row is None:
        raise UnknownCustomer(customer_id)
    return locked_account(row)


def lock_account_by_id(session: Session, account_id: int) -> LockedAccount:
    """Lock and read an account by its row id."""
    return locked_account(run(session, _LOCK_BY_ID, {"account_id": account_id}).one())


def save_account(session: Session, account: LockedAccount) -> None:
    """Write the account's projection and drop stale copies of what moved from the session."""
    run(
        session,
        _SAVE_ACCOUNT,
        {
            "account_id": account.id,
            "new_balance": account.balance,
            "new_held": account.held,
            "new_debt": account.debt,
            "now": utcnow(),
        },
    )
    if session.identity_map:
        forget(session, Account, [account.id])
        forget(session, Grant, account.moved_grants)
    account.moved_grants.clear()


def forget(session: Session, model: type[Any], ids: Iterable[int]) -> None:
    """Expire in-session ORM copies of rows changed with Core statements, so callers never read stale units."""
    for row_id in ids:
        obj = session.identity_map.get(session.identity_key(model, row_id))
        if obj is not None:
            session.expire(obj)


def check_access(account: LockedAccount, now: datetime) -> frozenset[str] | None:
    """The grant sources the account's access state may spend ([access.spend]; None: all); refuse when none."""
    sources = spendable_sources(account.access_state, account.grace_until, now)
    if sources is not None and not sources:
        key = policy_key(account.access_state, account.grace_until, now)
        raise AccessRefused(account.customer_id, account.access_state.value, refusal_reason(key, sources))
    return sources


def insert_entry(
    session: Session,
    account: LockedAccount,
    *,
    kind: EntryKind,
    units: int,
    key: str,
    debt_delta: int = 0,
    frozen_delta: int = 0,
    request_hash: str | None = None,
    grant_id: int | None = None,
    hold_id: int | None = None,
    usage_id: int | None = None,
    stripe_object_id: str | None = None,
    actor: str = "system",
    reason: str = "",
    allocations: Sequence[tuple[int, int]] = (),
) -> tuple[int, int]:
    """Append one entry (and its allocations), apply it to ``account``; return (entry id, balance after).

    An entry moves ``units + debt_delta`` units in grants. When one grant takes the whole movement, the entry's
    ``grant_id`` names it and no allocation row is written (the common case, kept cheap); otherwise one
    allocation row per grant says how the movement was split.
    """
    allocations = [(g, u) for g, u in allocations if u != 0]
    if len(allocations) == 1 and grant_id in (None, allocations[0][0]):
        grant_id, allocations = allocations[0][0], []
    account.balance += units
    account.debt += debt_delta
    entry_id: int = run(
        session,
        _INSERT_ENTRY,
        {
            "account_id": account.id,
            "kind": kind,
            "units": units,
            "balance_after": account.balance,
            "debt_delta": debt_delta,
            "frozen_delta": frozen_delta,
            "idempotency_key": key,
            "request_hash": request_hash,
            "grant_id": grant_id,
            "hold_id": hold_id,
            "usage_id": usage_id,
            "stripe_object_id": stripe_object_id,
            "actor": actor,
            "reason": reason,
        },
    ).scalar_one()
    if allocations:
        run(session, _INSERT_ALLOCATION, [{"entry_id": entry_id, "grant_id": g, "units": u} for g, u in allocations])
    return entry_id, account.balance


def entry_movements(
    session: Session, entry_id: int, grant_id: int | None, units: int, debt_delta: int
) -> list[tuple[int, int]]:
    """How an entry moved grant units, as (grant id, signed units): its allocation rows, else its one grant."""
    rows = session.execute(
        select(ALLOCATIONS.c.grant_id, ALLOCATIONS.c.units)
        .where(ALLOCATIONS.c.entry_id == entry_id)
        .order_by(ALLOCATIONS.c.id)
    ).all()
    if rows:
        return [(g, u) for g, u in rows]
    moved = units + debt_delta
    return [(grant_id, moved)] if grant_id is not None and moved else []


def move_grant_units(session: Session, account: LockedAccount, deltas: Sequence[tuple[int, int]]) -> None:
    """Add signed ``deltas`` to grants' remaining units (the CHECK constraint refuses a negative result)."""
    params = [{"gid": g, "delta": d} for g, d in deltas if d != 0]
    if not params:
        return
    run(session, _MOVE_GRANT_UNITS, params)
    account.moved_grants.update(g for g, _ in deltas)


@dataclass(frozen=True)
class DrawableGrant:
    id: int
    remaining: int
    expires_at: datetime | None
    source: str | None = None


def drawable_grants(
    session: Session, account_id: int, now: datetime
) -> tuple[list[DrawableGrant], list[DrawableGrant]]:
    """The account's grants with units left: (those consumption may draw, in draw order; those lapsed)."""
    rows = session.execute(
        select(GRANTS.c.id, GRANTS.c.remaining, GRANTS.c.expires_at, GRANTS.c.source)
        .where(GRANTS.c.account_id == account_id, GRANTS.c.remaining > 0)
        # Draw order: higher priority first, then earliest expiry (never-expiring last), then oldest.
        .order_by(GRANTS.c.priority.desc(), GRANTS.c.expires_at.is_(None), GRANTS.c.expires_at, GRANTS.c.id)
    ).all()
    eligible: list[DrawableGrant] = []
    lapsed: list[DrawableGrant] = []
    for row in rows:
        grant = DrawableGrant(row.id, row.remaining, as_utc(row.expires_at), str(row.source))
        (lapsed if grant.expires_at is not None and grant.expires_at <= now else eligible).append(grant)
    return eligible, lapsed


def expire_lapsed(session: Session, account: LockedAccount, lapsed: Sequence[DrawableGrant], now: datetime) -> int:
    """Expire grants whose time has passed (units left over become an EXPIRE entry); return units expired."""
    total = 0
    for grant in lapsed:
        move_grant_units(session, account, [(grant.id, -grant.remaining)])
        session.execute(update(GRANTS).where(GRANTS.c.id == grant.id).values(expired_at=now))
        insert_entry(
            session,
            account,
            kind=EntryKind.EXPIRE,
            units=-grant.remaining,
            key=f"expire:{grant.id}:{grant.remaining}:{now.isoformat()}",
            grant_id=grant.id,
            reason="grant expired",
            allocations=[(grant.id, -grant.remaining)],
        )
        total += grant.remaining
    return total


def plan_draw(eligible: Sequence[DrawableGrant], units: int) -> tuple[list[tuple[int, int]], int]:
    """Which grants fund ``units`` in draw order, as (grant id, units drawn); and the part no grant covers."""
    funded: list[tuple[int, int]] = []
    need = units
    for grant in eligible:
        if need == 0:
            break
        take = min(need, grant.remaining)
        funded.append((grant.id, take))
        need -= take
    return funded, need


def return_to_grants(
    session: Session, account: LockedAccount, units: int, drawn: Sequence[tuple[int, int]], debt_funded: int
) -> tuple[list[tuple[int, int]], int]:
    """Give ``units`` back: first cancel debt the draw created, then refill its grants, last drawn first.

    ``drawn`` is (grant id, units drawn) in draw order. Returns the allocations (grant id, +units) and the debt
    cancelled (a negative debt delta's magnitude).
    """
    debt_back = min(units, debt_funded, account.debt)
    left = units - debt_back
    back: list[tuple[int, int]] = []
    for grant_id, drawn_units in reversed(drawn):
        if left == 0:
            break
        give = min(left, drawn_units)
        back.append((grant_id, give))
        left -= give
    if left:
        # The debt this draw created was settled by a later grant meanwhile: that grant paid for these units,
        # so they go back to the account's newest grant, keeping every unit accounted for.
        newest = session.execute(
            select(GRANTS.c.id).where(GRANTS.c.account_id == account.id).order_by(GRANTS.c.id.desc()).limit(1)
        ).scalar_one()
        back.append((newest, left))
    move_grant_units(session, account, back)
    return back, debt_back
