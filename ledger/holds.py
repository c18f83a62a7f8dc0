"""Holds: units reserved for an AI call that may time out, then captured, released, or expired.

A hold is a movement: placing it draws the units from grants (so they cannot be spent twice) and raises the
account's ``held``; a capture charges what the call really used, and a release gives the rest back to the grants
the hold drew from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, insert, select, update
from sqlalchemy.orm import Session

from ledger.consume import charge_for
from ledger.errors import HoldNotOpen, IdempotencyConflict, InvalidRequest, UnknownHold
from ledger.models import EntryKind, Hold, HoldStatus
from ledger.portable import debit, find_original, insert_usage
from ledger.posting import (
    ENTRIES,
    LockedAccount,
    as_utc,
    check_access,
    entry_movements,
    forget,
    insert_entry,
    lock_account,
    lock_account_by_id,
    request_hash,
    require_key,
    return_to_grants,
    save_account,
    utcnow,
)
from ledger.pricing import UsageInput

HOLDS: Table = Hold.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class HoldResult:
    request_id: str
    customer_id: str
    units: int
    status: HoldStatus
    expires_at: datetime
    balance_after: int
    replayed: bool


@dataclass(frozen=True)
class CaptureResult:
    request_id: str
    customer_id: str
    held: int
    captured: int
    released: int
    shortfall: int
    balance_after: int
    replayed: bool


def _hold_key(request_id: str) -> str:
    return f"hold:{request_id}"


def _capture_key(request_id: str) -> str:
    return f"capture:{request_id}"


def _release_key(request_id: str) -> str:
    return f"release:{request_id}"


def _load_hold(session: Session, request_id: str) -> Any:
    row = session.execute(select(HOLDS).where(HOLDS.c.request_id == request_id)).one_or_none()
    if row is None:
        raise UnknownHold(request_id)
    return row


def _last_balance(session: Session, *keys: str) -> int:
    """The balance after the latest of the entries written under ``keys``."""
    balance: int = session.execute(
        select(ENTRIES.c.balance_after)
        .where(ENTRIES.c.idempotency_key.in_(keys))
        .order_by(ENTRIES.c.id.desc())
        .limit(1)
    ).scalar_one()
    return balance


def _hold_result(session: Session, hold: Any, customer_id: str, *, replayed: bool) -> HoldResult:
    keys = (_hold_key(hold.request_id), _capture_key(hold.request_id), _release_key(hold.request_id))
    return HoldResult(
        request_id=hold.request_id,
        customer_id=customer_id,
        units=hold.units,
        status=HoldStatus(hold.status),
        expires_at=as_utc(hold.expires_at) or utcnow(),
        balance_after=_last_balance(session, *keys),
        replayed=replayed,
    )


def place_hold(
    session: Session,
    customer_id: str,
    *,
    request_id: str,
    units: int | None = None,
    ttl_seconds: int = 600,
    usage: UsageInput | None = None,
    actor: str = "api",
) -> HoldResult:
    """Reserve units for a call under its request id; the same request id returns the original hold."""
    require_key("request_id", request_id)
    if not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
        raise InvalidRequest("ttl_seconds must be an integer > 0")
    charge = charge_for(units, usage)
    digest = request_hash(
        customer_id=customer_id,
        units=units,
        usage=dataclasses.asdict(usage) if usage is not None else None,
        ttl_seconds=ttl_seconds,
    )
    now = utcnow()
    account = lock_account(session, customer_id)
    original = find_original(session, _hold_key(request_id))
    if original is not None:
        if original.request_hash != digest:
            raise IdempotencyConflict(f"hold request id {request_id!r} was used with other parameters")
        hold = _load_hold(session, request_id)
        # The original result: the hold as placed (its status now is what capture or release returned).
        return HoldResult(
            request_id=request_id,
            customer_id=customer_id,
            units=hold.units,
            status=HoldStatus.OPEN,
            expires_at=as_utc(hold.expires_at) or now,
            balance_after=original.balance_after,
            replayed=True,
        )
    check_access(account, now)
    drawn, funded, uncovered = debit(session, account, charge, now)
    expires_at = now + timedelta(seconds=ttl_seconds)
    hold_id: int = session.execute(
        insert(HOLDS)
        .values(
            account_id=account.id, request_id=request_id, units=drawn, status=HoldStatus.OPEN, expires_at=expires_at
        )
        .returning(HOLDS.c.id)
    ).scalar_one()
    account.held += drawn
    _, balance_after = insert_entry(
        session,
        account,
        kind=EntryKind.HOLD,
        units=-drawn,
        debt_delta=uncovered,
        key=_hold_key(request_id),
        request_hash=digest,
        hold_id=hold_id,
        actor=actor,
        reason="hold placed",
        allocations=[(g, -u) for g, u in funded],
    )
    save_account(session, account)
    return HoldResult(request_id, customer_id, drawn, HoldStatus.OPEN, expires_at, balance_after, replayed=False)


def _give_back(
    session: Session, account: LockedAccount, hold: Any, units: int, *, key: str, actor: str, reason: str
) -> int:
    """Return ``units`` of a hold to the grants it drew from (and cancel debt it created); return balance after."""
    hold_entry = session.execute(
        select(ENTRIES.c.id, ENTRIES.c.grant_id, ENTRIES.c.units, ENTRIES.c.debt_delta).where(
            ENTRIES.c.idempotency_key == _hold_key(hold.request_id)
        )
    ).one()
    moved = entry_movements(session, hold_entry.id, hold_entry.grant_id, hold_entry.units, hold_entry.debt_delta)
    drawn = [(g, -u) for g, u in moved]
    back, debt_back = return_to_grants(session, account, units, drawn, hold_entry.debt_delta)
    _, balance_after = insert_entry(
        session,
        account,
        kind=EntryKind.RELEASE,
        units=units,
        debt_delta=-debt_back,
        key=key,
        hold_id=hold.id,
        actor=actor,
        reason=reason,
        allocations=back,
    )
    return balance_after


def capture_hold(
    session: Session,
    request_id: str,
    *,
    units: int | None = None,
    usage: UsageInput | None = None,
    actor: str = "api",
) -> CaptureResult:
    """Charge what the call used: fewer units than held releases the rest; more takes what the balance allows.

    Without units or usage, the held units are captured. The same request id returns the original capture.
    """
    require_key("request_id", request_id)
    hold = _load_hold(session, request_id)
    account = lock_account_by_id(session, hold.account_id)
    hold = _load_hold(session, request_id)  # re-read under the account lock
    digest = request_hash(
        request_id=request_id, units=units, usage=dataclasses.asdict(usage) if usage is not None else None
    )
    key = _capture_key(request_id)
    original = find_original(session, key)
    if original is not None:
        if original.request_hash != digest:
            raise IdempotencyConflict(f"capture of {request_id!r} was repeated with other parameters")
        return CaptureResult(
            request_id=request_id,
            customer_id=account.customer_id,
            held=hold.units,
            captured=hold.captured_units,
            released=max(0, hold.units - hold.captured_units),
            shortfall=hold.shortfall,
            balance_after=_last_balance(session, key, f"capture-release:{request_id}"),
            replayed=True,
        )
    if HoldStatus(hold.status) is not HoldStatus.OPEN:
        raise HoldNotOpen(f"hold {request_id!r} is {hold.status}, it cannot be captured")
    wanted = hold.units if units is None and usage is None else charge_for(units, usage)
    now = utcnow()
    held = hold.units
    funded: list[tuple[int, int]] = []
    extra, uncovered, shortfall = 0, 0, 0
    if wanted > held:
        # The call used more than was held: charge what the balance (and overdraft) allows, report the rest.
        extra, funded, uncovered = debit(session, account, wanted - held, now, partial=True)
        shortfall = wanted - held - extra
    captured = min(wanted, held) + extra
    usage_id = insert_usage(session, account.id, request_id, usage, captured, now) if usage is not None else None
    account.held -= held
    _, balance_after = insert_entry(
        session,
        account,
        kind=EntryKind.CAPTURE,
        units=-extra,
        debt_delta=uncovered,
        key=key,
        request_hash=digest,
        hold_id=hold.id,
        usage_id=usage_id,
        actor=actor,
        reason=f"captured {captured} of {held} held" + (f", {shortfall} short" if shortfall else ""),
        allocations=[(g, -u) for g, u in funded],
    )
    released = held - min(wanted, held)
    if released:
        balance_after = _give_back(
            session,
            account,
            hold,
            released,
            key=f"capture-release:{request_id}",
            actor=actor,
            reason="unused part of a captured hold",
        )
    session.execute(
        update(HOLDS)
        .where(HOLDS.c.id == hold.id)
        .values(
            status=HoldStatus.CAPTURED, captured_units=captured, shortfall=shortfall, settled_at=now, usage_id=usage_id
        )
    )
    forget(session, Hold, [hold.id])
    save_account(session, account)
    return CaptureResult(
        request_id=request_id,
        customer_id=account.customer_id,
        held=held,
        captured=captured,
        released=released,
        shortfall=shortfall,
        balance_after=balance_after,
        replayed=False,
    )


def _release(
    session: Session, account: LockedAccount, hold: Any, status: HoldStatus, actor: str, now: datetime
) -> None:
    _give_back(
        session,
        account,
        hold,
        hold.units,
        key=_release_key(hold.request_id),
        actor=actor,
        reason="hold expired" if status is HoldStatus.EXPIRED else "hold released",
    )
    account.held -= hold.units
    session.execute(update(HOLDS).where(HOLDS.c.id == hold.id).values(status=status, settled_at=now))
    forget(session, Hold, [hold.id])
    save_account(session, account)


def release_hold(session: Session, request_id: str, *, actor: str = "api") -> HoldResult:
    """Give a hold's units back; releasing a released or expired hold again changes nothing."""
    require_key("request_id", request_id)
    hold = _load_hold(session, request_id)
    account = lock_account_by_id(session, hold.account_id)
    hold = _load_hold(session, request_id)
    status = HoldStatus(hold.status)
    if status in (HoldStatus.RELEASED, HoldStatus.EXPIRED):
        return _hold_result(session, hold, account.customer_id, replayed=True)
    if status is HoldStatus.CAPTURED:
        raise HoldNotOpen(f"hold {request_id!r} was captured, it cannot be released")
    _release(session, account, hold, HoldStatus.RELEASED, actor, utcnow())
    return _hold_result(session, _load_hold(session, request_id), account.customer_id, replayed=False)


def release_expired_holds(session: Session, *, now: datetime) -> int:
    """Release every open hold past its expiry (status ``expired``); return how many."""
    now_utc = as_utc(now)
    assert now_utc is not None
    due = session.execute(
        select(HOLDS.c.request_id, HOLDS.c.account_id)
        .where(HOLDS.c.status == HoldStatus.OPEN, HOLDS.c.expires_at <= now_utc)
        .order_by(HOLDS.c.account_id, HOLDS.c.id)
    ).all()
    released = 0
    for request_id, account_id in due:
        account = lock_account_by_id(session, account_id)
        hold = _load_hold(session, request_id)
        if HoldStatus(hold.status) is not HoldStatus.OPEN:
            continue  # settled meanwhile by a concurrent capture or release
        _release(session, account, hold, HoldStatus.EXPIRED, "system", now_utc)
        released += 1
    return released
