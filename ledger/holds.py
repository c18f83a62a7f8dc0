"""Holds: units reserved for an AI call that may time out, then captured, released, or expired.

A hold is a movement: placing it draws the units from grants (so they cannot be spent twice) and raises the
account's ``held``; a capture charges what the call really used, and a release gives the rest back to the grants
the hold drew from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import Table, insert, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ledger import limits, pgfast
from ledger.access import describe_refusal, spendable_sources
from ledger.config import get_billing_config
from ledger.consume import charge_for
from ledger.consumption import usage_row
from ledger.db import get_engine, unit_of_work
from ledger.errors import (
    AccessRefused,
    HoldNotOpen,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    LedgerError,
    UnknownCustomer,
    UnknownHold,
)
from ledger.models import EntryKind, Hold, HoldStatus
from ledger.outbox import note_balance
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
R = TypeVar("R")

# PostgreSQL's holds, one round trip each (migration 0009): the same rules as the portable path below.
# Migration 0016 gave the hold and capture functions their limits (the hold's rows; the capture's usage).
HOLD_SIGNATURE = "ledger_hold(text, text, text, bigint, text, text, timestamptz, timestamptz, jsonb)"
_HOLD_CALL = (
    "SELECT status, hold_units, expires_at, balance_after, available, access_state, request_hash, limit_name,"
    " limit_used FROM ledger_hold(%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)"
)
_CAPTURE_CALL = (
    "SELECT status, customer_id, held, captured, released, shortfall, balance_after, hold_status, request_hash"
    " FROM ledger_capture(%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb)"
)
_RELEASE_CALL = (
    "SELECT status, customer_id, hold_units, hold_status, expires_at, balance_after FROM ledger_release(%s, %s, %s)"
)


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


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """A hold request, checked and priced: what each backend applies."""

    customer_id: str
    request_id: str
    charge: int
    digest: str
    actor: str
    now: datetime
    expires_at: datetime
    # What the hold counts against limits (its usage's attribution, the units held), when any are configured.
    counted: limits.LimitRequest | None = None


def price_hold(
    customer_id: str, *, request_id: str, units: int | None, ttl_seconds: int, usage: UsageInput | None, actor: str
) -> HoldRequest:
    """Check a hold request and price it (units given, else the usage's price), at the current time."""
    require_key("request_id", request_id)
    if not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
        raise InvalidRequest("ttl_seconds must be an integer > 0")
    digest = request_hash(
        customer_id=customer_id,
        units=units,
        usage=usage.as_dict() if usage is not None else None,
        ttl_seconds=ttl_seconds,
    )
    now = utcnow()
    charge = charge_for(units, usage)
    config = get_billing_config()
    counted = limits.limit_request(usage, units=charge, config=config) if limits.enforced(config) else None
    return HoldRequest(
        customer_id, request_id, charge, digest, actor, now, now + timedelta(seconds=ttl_seconds), counted
    )


def _prepare_limits(session: Session, request: HoldRequest) -> limits.PreparedLimits | None:
    """Check entitlements and suspension, and build the rows of the limits the hold counts against."""
    if request.counted is None:
        return None
    return limits.prepare_limits(session, request.customer_id, request.counted, now=request.now)


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
    request = price_hold(
        customer_id, request_id=request_id, units=units, ttl_seconds=ttl_seconds, usage=usage, actor=actor
    )
    if pgfast.installed(session, HOLD_SIGNATURE):
        return _place_hold_function(session, request)
    return _place_hold_portable(session, request)


def _place_hold_function(session: Session, request: HoldRequest) -> HoldResult:
    """The hold through ``ledger_hold``, its limits taken in the same statement."""
    try:
        prepared = _prepare_limits(session, request)
    except LedgerError:
        # A replay is recognized before the entitlements and suspension that refused it (as the portable path
        # does): a retry after the customer's plan changed gets the original hold. Its key is taken, so the
        # function without limits replays it (or answers a conflict) and takes no room.
        if find_original(session, _hold_key(request.request_id)) is None:
            raise
        prepared = None
    params = _hold_params(request, prepared)
    row = _keyed(request.request_id, lambda: pgfast.call(session, _HOLD_CALL, params))
    pgfast.forget_moved(session, [])
    return _placed(row, request, prepared)


def place_hold_standalone(
    customer_id: str,
    *,
    request_id: str,
    units: int | None = None,
    ttl_seconds: int = 600,
    usage: UsageInput | None = None,
    actor: str = "api",
) -> HoldResult:
    """:func:`place_hold` as a unit of work of its own (the usage API); on PostgreSQL one round trip."""
    request = price_hold(
        customer_id, request_id=request_id, units=units, ttl_seconds=ttl_seconds, usage=usage, actor=actor
    )
    engine = get_engine()
    function = pgfast.installed_for(engine, HOLD_SIGNATURE)
    if function and request.counted is None:
        params = _hold_params(request, None)
        row = _keyed(request_id, lambda: pgfast.call_autocommit(engine, _HOLD_CALL, params))
        return _placed(row, request, None)
    # With limits, the plans and suspension are read in the hold's own transaction.
    with unit_of_work() as session:
        if function:
            return _place_hold_function(session, request)
        return _place_hold_portable(session, request)


@dataclass(frozen=True)
class Statement(Generic[R]):
    """A standalone hold movement that is one call of a ledger function, for a caller that sends it itself (the
    usage API, from its event loop: :mod:`ledger.pgasync`): run ``sql`` with ``params`` in autocommit, then
    ``result(row)`` is what the ``*_standalone`` function returns, and ``refusal`` its error for a database error."""

    sql: str
    params: tuple[Any, ...]
    request_id: str
    read: Callable[[Any], R]

    def result(self, row: Any) -> R:
        """The movement's result from the function's row, or the ledger's error (a refusal)."""
        return self.read(row)

    def refusal(self, exc: DBAPIError) -> LedgerError | None:
        """The ledger's error for a database error that refused the request's input; None: not a refusal."""
        return pgfast.refused_request(exc, self.request_id)


def hold_statement(
    customer_id: str,
    *,
    request_id: str,
    units: int | None = None,
    ttl_seconds: int = 600,
    usage: UsageInput | None = None,
    actor: str = "api",
) -> Statement[HoldResult] | None:
    """:func:`place_hold_standalone` as its one statement, when it is one (PostgreSQL, ``ledger_hold`` known to be
    installed, no limit to read first); None: call :func:`place_hold_standalone`. A refused request raises here."""
    request = price_hold(
        customer_id, request_id=request_id, units=units, ttl_seconds=ttl_seconds, usage=usage, actor=actor
    )
    if request.counted is not None or not pgfast.known_installed(get_engine(), HOLD_SIGNATURE):
        return None
    return Statement(_HOLD_CALL, _hold_params(request, None), request_id, lambda row: _placed(row, request, None))


def _hold_params(request: HoldRequest, prepared: limits.PreparedLimits | None) -> tuple[Any, ...]:
    return (
        request.customer_id, request.request_id, _hold_key(request.request_id), request.charge, request.digest,
        request.actor, request.now, request.expires_at, prepared.as_json() if prepared is not None else None,
    )  # fmt: skip


def _keyed(request_id: str, call: Any) -> Any:
    """A ledger function's row; a refusal of the request's input by the database is the ledger's error."""
    try:
        return call()
    except DBAPIError as exc:
        refusal = pgfast.refused_request(exc, request_id)
        if refusal is None:
            raise
        raise refusal from exc


def _placed(row: Any, request: HoldRequest, prepared: limits.PreparedLimits | None) -> HoldResult:
    status, units, expires_at, balance_after, available, state, original_hash, limit_name, limit_used = row
    if status == "limit_exceeded" and prepared is not None:
        raise prepared.refusal(limit_name, limit_used)
    if status == "unknown_customer":
        raise UnknownCustomer(request.customer_id)
    if status == "access_refused":
        raise AccessRefused(request.customer_id, state, describe_refusal(state))
    if status == "insufficient":
        raise InsufficientCredits(request.customer_id, request.charge, available)
    if status == "replay" and original_hash != request.digest:
        raise IdempotencyConflict(f"hold request id {request.request_id!r} was used with other parameters")
    return HoldResult(
        request_id=request.request_id,
        customer_id=request.customer_id,
        units=units,
        status=HoldStatus.OPEN,
        expires_at=as_utc(expires_at) or request.now,
        balance_after=balance_after,
        replayed=status == "replay",
    )


def _place_hold_portable(session: Session, request: HoldRequest) -> HoldResult:
    if request.counted is None:
        return _place_hold_rows(session, request)
    # A limit refusing the hold after its draw undoes the draw: the hold is a savepoint of its own.
    savepoint = session.begin_nested()
    try:
        result = _place_hold_rows(session, request)
    except BaseException:
        savepoint.rollback()
        raise
    savepoint.commit()
    return result


def _place_hold_rows(session: Session, request: HoldRequest) -> HoldResult:
    customer_id, request_id, now = request.customer_id, request.request_id, request.now
    account = lock_account(session, customer_id)
    original = find_original(session, _hold_key(request_id))
    if original is not None:
        if original.request_hash != request.digest:
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
    prepared = _prepare_limits(session, request)
    sources = check_access(account, now)
    drawn, funded, uncovered = debit(session, account, request.charge, now, sources=sources)
    # After the draw, as ledger_hold: a hold the balance cannot cover is refused as insufficient first.
    if prepared is not None:
        limits.take_room(session, prepared)
    hold_id: int = session.execute(
        insert(HOLDS)
        .values(
            account_id=account.id,
            request_id=request_id,
            units=drawn,
            status=HoldStatus.OPEN,
            expires_at=request.expires_at,
            limit_rows=json.loads(prepared.as_json()) if prepared is not None else None,
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
        request_hash=request.digest,
        hold_id=hold_id,
        actor=request.actor,
        reason="hold placed",
        allocations=[(g, -u) for g, u in funded],
    )
    save_account(session, account)
    _note_drop(session, account, drawn, balance_after, cause="hold")
    return HoldResult(
        request_id, customer_id, drawn, HoldStatus.OPEN, request.expires_at, balance_after, replayed=False
    )


def _note_drop(session: Session, account: LockedAccount, units: int, balance_after: int, *, cause: str) -> None:
    """balance.low / balance.depleted when drawing ``units`` took the spendable balance across a line."""
    if units:
        note_balance(
            session,
            account_id=account.id,
            customer_id=account.customer_id,
            before=max(0, balance_after + units + account.overdraft_limit),
            after=max(0, balance_after + account.overdraft_limit),
            cause=cause,
        )


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


@dataclass(frozen=True, slots=True)
class CaptureRequest:
    """A capture request, checked and priced: ``wanted`` is None for "what was held"."""

    request_id: str
    wanted: int | None
    usage: UsageInput | None
    digest: str
    actor: str
    now: datetime
    note: str = ""
    # The tokens and cost (10^-10 USD) the capture's usage reports, to settle the hold's limits; None: unknown.
    limit_usage: tuple[int, int] | None = None


def price_capture(
    request_id: str, *, units: int | None, usage: UsageInput | None, actor: str, note: str = ""
) -> CaptureRequest:
    """Check a capture request and price what the call used (before any lookup: a bad body is refused first)."""
    require_key("request_id", request_id)
    digest = request_hash(
        request_id=request_id,
        units=units,
        usage=usage.as_dict() if usage is not None else None,
        **({"note": note} if note else {}),  # without a note, the digest of captures stored before notes existed
    )
    wanted = None if units is None and usage is None else charge_for(units, usage)
    config = get_billing_config()
    counted = limits.limit_usage_of_capture(usage, config) if config.limits else None
    return CaptureRequest(request_id, wanted, usage, digest, actor, utcnow(), note, counted)


@dataclass(frozen=True)
class ReleaseNote:
    """Why a hold is released and the provider call it stood for (``provider_timeout``: maybe served anyway)."""

    reason: str
    provider: str | None = None
    model: str | None = None
    provider_request_id: str | None = None

    def describe(self) -> str:
        """The release entry's reason text."""
        call = ", ".join(
            f"{k} {v}"
            for k, v in (
                ("provider", self.provider),
                ("model", self.model),
                ("provider request", self.provider_request_id),
            )
            if v
        )
        return f"hold released: {self.reason}" + (f" ({call})" if call else "")


def capture_hold(
    session: Session,
    request_id: str,
    *,
    units: int | None = None,
    usage: UsageInput | None = None,
    actor: str = "api",
    note: str = "",
) -> CaptureResult:
    """Charge what the call used: fewer units than held releases the rest; more takes what the balance allows.

    Without units or usage, the held units are captured. The same request id returns the original capture.
    ``note`` is added to the capture entry's reason (e.g. that the usage was estimated, not reported).
    """
    request = price_capture(request_id, units=units, usage=usage, actor=actor, note=note)
    # A noted capture (rare: an estimate) takes the portable path, which writes the note; the function does not.
    if not note and pgfast.installed(session, HOLD_SIGNATURE):
        row = _keyed(request_id, lambda: pgfast.call(session, _CAPTURE_CALL, _capture_params(request)))
        pgfast.forget_moved(session, [])
        forget(session, Hold, _hold_ids(session, request_id))
        return _captured(row, request)
    return _capture_portable(session, request)


def capture_hold_standalone(
    request_id: str,
    *,
    units: int | None = None,
    usage: UsageInput | None = None,
    actor: str = "api",
    note: str = "",
) -> CaptureResult:
    """:func:`capture_hold` as a unit of work of its own (the usage API); on PostgreSQL one round trip."""
    request = price_capture(request_id, units=units, usage=usage, actor=actor, note=note)
    engine = get_engine()
    if not note and pgfast.installed_for(engine, HOLD_SIGNATURE):
        row = _keyed(request_id, lambda: pgfast.call_autocommit(engine, _CAPTURE_CALL, _capture_params(request)))
        return _captured(row, request)
    with unit_of_work() as session:
        return _capture_portable(session, request)


def capture_statement(
    request_id: str, *, units: int | None = None, usage: UsageInput | None = None, actor: str = "api", note: str = ""
) -> Statement[CaptureResult] | None:
    """:func:`capture_hold_standalone` as its one statement, when it is one (see :func:`hold_statement`)."""
    request = price_capture(request_id, units=units, usage=usage, actor=actor, note=note)
    if note or not pgfast.known_installed(get_engine(), HOLD_SIGNATURE):
        return None
    return Statement(_CAPTURE_CALL, _capture_params(request), request_id, lambda row: _captured(row, request))


def _capture_params(request: CaptureRequest) -> tuple[Any, ...]:
    usage_json = None
    if request.usage is not None:
        # The function records the units it captured; the row's other fields are the usage's.
        usage_json = json.dumps(usage_row(0, request.request_id, request.usage, 0, request.now), default=str)
    limit_usage = None
    if request.limit_usage is not None:
        limit_usage = json.dumps({"tokens": request.limit_usage[0], "cost_usd": request.limit_usage[1]})
    return (request.request_id, request.wanted, request.digest, request.actor, request.now, usage_json, limit_usage)


def _hold_ids(session: Session, request_id: str) -> list[int]:
    if not session.identity_map:
        return []
    return list(session.execute(select(HOLDS.c.id).where(HOLDS.c.request_id == request_id)).scalars())


def _captured(row: Any, request: CaptureRequest) -> CaptureResult:
    status, customer_id, held, captured, released, shortfall, balance_after, hold_status, original_hash = row
    if status == "unknown_hold":
        raise UnknownHold(request.request_id)
    if status == "not_open":
        raise HoldNotOpen(f"hold {request.request_id!r} is {hold_status}, it cannot be captured")
    if status == "replay" and original_hash != request.digest:
        raise IdempotencyConflict(f"capture of {request.request_id!r} was repeated with other parameters")
    return CaptureResult(
        request_id=request.request_id,
        customer_id=customer_id,
        held=held,
        captured=captured,
        released=released,
        shortfall=shortfall,
        balance_after=balance_after,
        replayed=status == "replay",
    )


def _capture_portable(session: Session, request: CaptureRequest) -> CaptureResult:
    request_id, usage, actor = request.request_id, request.usage, request.actor
    hold = _load_hold(session, request_id)
    account = lock_account_by_id(session, hold.account_id)
    hold = _load_hold(session, request_id)  # re-read under the account lock
    key = _capture_key(request_id)
    original = find_original(session, key)
    if original is not None:
        if original.request_hash != request.digest:
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
    wanted = hold.units if request.wanted is None else request.wanted
    now = request.now
    held = hold.units
    funded: list[tuple[int, int]] = []
    extra, uncovered, shortfall = 0, 0, 0
    if wanted > held:
        # The call used more than was held: charge what the balance (and overdraft) allows, report the rest.
        extra, funded, uncovered = debit(
            session,
            account,
            wanted - held,
            now,
            partial=True,
            sources=spendable_sources(account.access_state, account.grace_until, now),
        )
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
        request_hash=request.digest,
        hold_id=hold.id,
        usage_id=usage_id,
        actor=actor,
        reason=f"captured {captured} of {held} held"
        + (f", {shortfall} short" if shortfall else "")
        + (f"; {request.note}" if request.note else ""),
        allocations=[(g, -u) for g, u in funded],
    )
    tokens, cost = request.limit_usage if request.limit_usage is not None else (None, None)
    limits.settle_limits(session, hold.limit_rows, units=captured, tokens=tokens, cost_usd=cost)
    _note_drop(session, account, extra, balance_after, cause="capture")  # extra > 0 releases nothing below
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
    session: Session,
    account: LockedAccount,
    hold: Any,
    status: HoldStatus,
    actor: str,
    now: datetime,
    note: ReleaseNote | None = None,
) -> None:
    _give_back(
        session,
        account,
        hold,
        hold.units,
        key=_release_key(hold.request_id),
        actor=actor,
        reason="hold expired" if status is HoldStatus.EXPIRED else note.describe() if note else "hold released",
    )
    account.held -= hold.units
    limits.settle_limits(session, hold.limit_rows, requests=0, units=0, tokens=0, cost_usd=0)
    noted = {}
    if note is not None:
        noted = {
            "release_reason": note.reason,
            "provider": note.provider,
            "model": note.model,
            "provider_request_id": note.provider_request_id,
        }
    session.execute(update(HOLDS).where(HOLDS.c.id == hold.id).values(status=status, settled_at=now, **noted))
    forget(session, Hold, [hold.id])
    save_account(session, account)


def release_hold(
    session: Session, request_id: str, *, actor: str = "api", note: ReleaseNote | None = None
) -> HoldResult:
    """Give a hold's units back; releasing a released or expired hold again changes nothing.

    ``note`` records why (kept on the hold and in the release entry); a repeated release keeps the first one.
    """
    require_key("request_id", request_id)
    # A noted release (a failed provider call) takes the portable path, which stores the note.
    if note is None and pgfast.installed(session, HOLD_SIGNATURE):
        row = pgfast.call(session, _RELEASE_CALL, (request_id, actor, utcnow()))
        pgfast.forget_moved(session, [])
        forget(session, Hold, _hold_ids(session, request_id))
        return _released(row, request_id)
    return _release_portable(session, request_id, actor, note)


def release_hold_standalone(request_id: str, *, actor: str = "api", note: ReleaseNote | None = None) -> HoldResult:
    """:func:`release_hold` as a unit of work of its own (the usage API); on PostgreSQL one round trip."""
    require_key("request_id", request_id)
    engine = get_engine()
    if note is None and pgfast.installed_for(engine, HOLD_SIGNATURE):
        return _released(pgfast.call_autocommit(engine, _RELEASE_CALL, (request_id, actor, utcnow())), request_id)
    with unit_of_work() as session:
        return _release_portable(session, request_id, actor, note)


def _released(row: Any, request_id: str) -> HoldResult:
    status, customer_id, units, hold_status, expires_at, balance_after = row
    if status == "unknown_hold":
        raise UnknownHold(request_id)
    if status == "not_open":
        raise HoldNotOpen(f"hold {request_id!r} was captured, it cannot be released")
    return HoldResult(
        request_id=request_id,
        customer_id=customer_id,
        units=units,
        status=HoldStatus(hold_status),
        expires_at=as_utc(expires_at) or utcnow(),
        balance_after=balance_after,
        replayed=status == "replay",
    )


def _release_portable(session: Session, request_id: str, actor: str, note: ReleaseNote | None = None) -> HoldResult:
    hold = _load_hold(session, request_id)
    account = lock_account_by_id(session, hold.account_id)
    hold = _load_hold(session, request_id)
    status = HoldStatus(hold.status)
    if status in (HoldStatus.RELEASED, HoldStatus.EXPIRED):
        return _hold_result(session, hold, account.customer_id, replayed=True)
    if status is HoldStatus.CAPTURED:
        raise HoldNotOpen(f"hold {request_id!r} was captured, it cannot be released")
    _release(session, account, hold, HoldStatus.RELEASED, actor, utcnow(), note)
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
