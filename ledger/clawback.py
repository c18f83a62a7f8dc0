"""Clawbacks (refunds, lost disputes) and freezes (open disputes) of a grant's units."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from ledger import pgfast
from ledger.errors import IdempotencyConflict, InvalidRequest
from ledger.models import EntryKind, Grant
from ledger.outbox import balance_dropped
from ledger.posting import (
    ACCOUNT_COLUMNS,
    ACCOUNTS,
    ENTRIES,
    GRANTS,
    LockedAccount,
    forget,
    insert_entry,
    locked_account,
    request_hash,
    require_key,
    require_positive,
    run,
    save_account,
    utcnow,
)


@dataclass(frozen=True)
class ClawbackResult:
    grant_id: int
    customer_id: str
    requested: int
    clawed: int  # units taken from the grant's remaining and frozen units
    debt: int  # units already spent, recorded as account debt
    replayed: bool


# The grant's account, locked through the grant in one statement; then the grant, read under that lock.
_LOCK_GRANT_ACCOUNT = (
    select(*ACCOUNT_COLUMNS)
    .where(ACCOUNTS.c.id == select(GRANTS.c.account_id).where(GRANTS.c.id == bindparam("gid")).scalar_subquery())
    .with_for_update(key_share=True)
)
_GRANT = select(GRANTS).where(GRANTS.c.id == bindparam("gid"))
_ORIGINAL = select(ENTRIES.c.units, ENTRIES.c.debt_delta, ENTRIES.c.frozen_delta, ENTRIES.c.request_hash).where(
    ENTRIES.c.idempotency_key == bindparam("key")
)
_SET_GRANT = (
    update(GRANTS)
    .where(GRANTS.c.id == bindparam("gid"))
    .values(
        remaining=GRANTS.c.remaining + bindparam("remaining_delta"),
        frozen=GRANTS.c.frozen + bindparam("frozen_delta"),
        clawed_back=GRANTS.c.clawed_back + bindparam("clawed_delta"),
    )
)


def _lock_grant(session: Session, grant_id: int) -> tuple[LockedAccount, Any]:
    """Lock the account owning ``grant_id`` and read the grant under that lock."""
    row = run(session, _LOCK_GRANT_ACCOUNT, {"gid": grant_id}).one_or_none()
    if row is None:
        raise InvalidRequest(f"unknown grant {grant_id}")
    return locked_account(row), run(session, _GRANT, {"gid": grant_id}).one()


def _original(session: Session, key: str, digest: str, what: str) -> Any:
    row = run(session, _ORIGINAL, {"key": key}).one_or_none()
    if row is not None and row.request_hash != digest:
        raise IdempotencyConflict(f"{what} key was used with other parameters")
    return row


def _set_grant(
    session: Session, account: LockedAccount, grant_id: int, *, remaining: int = 0, frozen: int = 0, clawed: int = 0
) -> None:
    """Add signed deltas to a grant's remaining, frozen and clawed-back units."""
    params = {"gid": grant_id, "remaining_delta": remaining, "frozen_delta": frozen, "clawed_delta": clawed}
    run(session, _SET_GRANT, params)
    account.moved_grants.add(grant_id)
    forget(session, Grant, [grant_id])


_MOVEMENT_SIGNATURE = "ledger_grant_movement(text, bigint, bigint, text, text, text, text, text, timestamptz)"
_MOVEMENT_CALL = (
    "SELECT status, customer_id, units, debt_delta, frozen_delta, request_hash "
    "FROM ledger_grant_movement(%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


@dataclass(frozen=True)
class _Moved:
    """The entry a movement wrote (or found, for a replay), as ``ledger_grant_movement`` answers it."""

    customer_id: str
    units: int
    debt_delta: int
    frozen_delta: int
    replayed: bool


def _move_in_function(
    session: Session,
    kind: EntryKind,
    grant_id: int,
    *,
    units: int,
    key: str,
    digest: str,
    reason: str,
    actor: str,
    stripe_object_id: str | None,
) -> _Moved | None:
    """One round trip on PostgreSQL (migration 0007); None where the portable path must run instead."""
    if not pgfast.installed(session, _MOVEMENT_SIGNATURE):
        return None
    params = (kind.value, grant_id, units, key, digest, reason, actor, stripe_object_id, utcnow())
    status, customer_id, moved, debt_delta, frozen_delta, original_hash = pgfast.call(session, _MOVEMENT_CALL, params)
    if status == "unknown_grant":
        raise InvalidRequest(f"unknown grant {grant_id}")
    if status == "replay" and original_hash != digest:
        raise IdempotencyConflict(f"{kind.value} key was used with other parameters")
    pgfast.forget_moved(session, [grant_id])
    return _Moved(customer_id, moved, debt_delta, frozen_delta, replayed=status == "replay")


def clawback(
    session: Session,
    grant_id: int,
    *,
    units: int,
    idempotency_key: str,
    reason: str,
    actor: str = "system",
    stripe_object_id: str | None = None,
) -> ClawbackResult:
    """Take ``units`` back from a grant: its remaining units first, then its frozen ones; the rest was spent
    and becomes recorded debt. Never more than the grant gave, net of earlier clawbacks."""
    require_positive("units", units)
    require_key("idempotency_key", idempotency_key)
    key = f"clawback:{idempotency_key}"
    digest = request_hash(grant_id=grant_id, units=units)
    moved = _move_in_function(
        session, EntryKind.CLAWBACK, grant_id, units=units, key=key, digest=digest, reason=reason, actor=actor,
        stripe_object_id=stripe_object_id,
    )  # fmt: skip
    if moved is not None:
        clawed = -moved.units - moved.debt_delta - moved.frozen_delta
        if not moved.replayed:
            balance_dropped(session, moved.customer_id, -moved.units, cause="credits.clawed_back")
        return ClawbackResult(grant_id, moved.customer_id, units, clawed, moved.debt_delta, moved.replayed)
    account, grant = _lock_grant(session, grant_id)
    original = _original(session, key, digest, "clawback")
    if original is not None:
        debt = original.debt_delta
        return ClawbackResult(
            grant_id, account.customer_id, units, -original.units - debt - original.frozen_delta, debt, replayed=True
        )
    wanted = min(units, grant.units - grant.clawed_back)
    from_remaining = min(wanted, grant.remaining)
    from_frozen = min(wanted - from_remaining, grant.frozen)
    debt = wanted - from_remaining - from_frozen
    if wanted:
        insert_entry(
            session,
            account,
            kind=EntryKind.CLAWBACK,
            units=-(from_remaining + debt),
            debt_delta=debt,
            frozen_delta=-from_frozen,
            key=key,
            request_hash=digest,
            grant_id=grant_id,
            stripe_object_id=stripe_object_id,
            actor=actor,
            reason=reason,
            allocations=[(grant_id, -from_remaining)],
        )
        _set_grant(
            session,
            account,
            grant_id,
            remaining=-from_remaining,
            frozen=-from_frozen,
            clawed=wanted,
        )
    else:
        # Nothing left to take: record the request anyway so a replay is recognised as one.
        insert_entry(
            session,
            account,
            kind=EntryKind.CLAWBACK,
            units=0,
            key=key,
            request_hash=digest,
            grant_id=grant_id,
            stripe_object_id=stripe_object_id,
            actor=actor,
            reason=reason,
        )
    save_account(session, account)
    balance_dropped(session, account.customer_id, from_remaining + debt, cause="credits.clawed_back")
    return ClawbackResult(grant_id, account.customer_id, units, from_remaining + from_frozen, debt, replayed=False)


def freeze_grant(session: Session, grant_id: int, *, idempotency_key: str, reason: str) -> int:
    """A dispute opened: set aside what remains of the grant (not spendable, not yet lost); return units frozen."""
    require_key("idempotency_key", idempotency_key)
    key = f"freeze:{idempotency_key}"
    digest = request_hash(grant_id=grant_id, action="freeze")
    moved = _move_in_function(
        session, EntryKind.FREEZE, grant_id, units=0, key=key, digest=digest, reason=reason, actor="system",
        stripe_object_id=None,
    )  # fmt: skip
    if moved is not None:
        if not moved.replayed:
            balance_dropped(session, moved.customer_id, -moved.units, cause="dispute.frozen")
        return moved.frozen_delta
    account, grant = _lock_grant(session, grant_id)
    original = _original(session, key, digest, "freeze")
    if original is not None:
        frozen: int = original.frozen_delta
        return frozen
    units = grant.remaining
    insert_entry(
        session,
        account,
        kind=EntryKind.FREEZE,
        units=-units,
        frozen_delta=units,
        key=key,
        request_hash=digest,
        grant_id=grant_id,
        reason=reason,
        allocations=[(grant_id, -units)],
    )
    _set_grant(session, account, grant_id, remaining=-units, frozen=units)
    save_account(session, account)
    balance_dropped(session, account.customer_id, units, cause="dispute.frozen")
    return int(units)


def unfreeze_grant(session: Session, grant_id: int, *, idempotency_key: str, reason: str) -> int:
    """A dispute won: give the grant's frozen units back; return units unfrozen."""
    require_key("idempotency_key", idempotency_key)
    key = f"unfreeze:{idempotency_key}"
    digest = request_hash(grant_id=grant_id, action="unfreeze")
    moved = _move_in_function(
        session, EntryKind.UNFREEZE, grant_id, units=0, key=key, digest=digest, reason=reason, actor="system",
        stripe_object_id=None,
    )  # fmt: skip
    if moved is not None:
        return -moved.frozen_delta
    account, grant = _lock_grant(session, grant_id)
    original = _original(session, key, digest, "unfreeze")
    if original is not None:
        return int(-original.frozen_delta)
    units = grant.frozen
    insert_entry(
        session,
        account,
        kind=EntryKind.UNFREEZE,
        units=units,
        frozen_delta=-units,
        key=key,
        request_hash=digest,
        grant_id=grant_id,
        reason=reason,
        allocations=[(grant_id, units)],
    )
    _set_grant(session, account, grant_id, remaining=units, frozen=-units)
    save_account(session, account)
    return int(units)
