"""Grants: credits added to an account (top-ups, renewals, promotions, adjustments), and their expiry."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from ledger import pgfast
from ledger.accounts import lock_or_open_account, open_account
from ledger.config import get_billing_config
from ledger.errors import IdempotencyConflict, InvalidRequest, UnknownCustomer
from ledger.limits import customer_plans
from ledger.models import EntryKind, Grant, GrantSource
from ledger.outbox import note_balance, refresh_threshold, spendable
from ledger.posting import (
    ENTRIES,
    GRANTS,
    as_utc,
    drawable_grants,
    expire_lapsed,
    for_each_backend,
    insert_entry,
    lock_account_by_id,
    request_hash,
    require_key,
    require_positive,
    run,
    save_account,
    utcnow,
)

_INSERT_GRANT = for_each_backend(
    lambda dialect: (
        dialect.insert(GRANTS).on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(GRANTS.c.id)
    )
)
_ORIGINAL_GRANT = select(ENTRIES.c.grant_id, ENTRIES.c.units, ENTRIES.c.balance_after, ENTRIES.c.request_hash).where(
    ENTRIES.c.idempotency_key == bindparam("key")
)


_FUNCTION_SIGNATURE = (
    "ledger_grant(text, bigint, text, text, text, text, text, integer, timestamptz, text, text, bigint, text, "
    "timestamptz, timestamptz, timestamptz)"
)
_CALL = (
    "SELECT status, grant_id, units, balance_after, request_hash "
    "FROM ledger_grant(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


@dataclass(frozen=True)
class GrantResult:
    grant_id: int
    customer_id: str
    units: int
    balance_after: int
    replayed: bool


def _aware(name: str, value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise InvalidRequest(f"{name} must be a timezone-aware datetime")
    return as_utc(value)


def grant_credits(
    session: Session,
    customer_id: str,
    *,
    units: int,
    source: GrantSource,
    idempotency_key: str,
    reason: str = "",
    actor: str = "system",
    priority: int = 0,
    expires_at: datetime | None = None,
    stripe_object_id: str | None = None,
    stripe_object_type: str | None = None,
    amount_minor: int | None = None,
    currency: str | None = None,
    period_start: datetime | None = None,
    period_end: datetime | None = None,
) -> GrantResult:
    """Add credits to a customer's account (opening it if needed); the same key returns the original grant.

    Outstanding debt (from clawbacks or overdraft) is settled from the new grant first, in a DEBT_SETTLEMENT
    entry, so ``balance == sum(remaining) - debt`` keeps holding.
    """
    require_positive("units", units)
    require_key("idempotency_key", idempotency_key)
    try:
        source = GrantSource(source)
    except ValueError as exc:
        raise InvalidRequest(f"unknown grant source {source!r}") from exc
    if not isinstance(priority, int):
        raise InvalidRequest("priority must be an integer")
    expires_at = _aware("expires_at", expires_at)
    digest = request_hash(
        customer_id=customer_id,
        units=units,
        source=source.value,
        priority=priority,
        expires_at=expires_at,
        stripe_object_id=stripe_object_id,
    )
    currency = currency.lower() if currency else None
    period_start, period_end = _aware("period_start", period_start), _aware("period_end", period_end)
    if pgfast.installed(session, _FUNCTION_SIGNATURE):
        result = _grant_in_function(
            session,
            customer_id,
            (units, source.value, idempotency_key, digest, reason, actor, priority, expires_at, stripe_object_id,
             stripe_object_type, amount_minor, currency, period_start, period_end),
        )  # fmt: skip
        if not result.replayed:
            _after_grant(session, customer_id)
        return result
    entry_key = f"grant:{idempotency_key}"
    account = lock_or_open_account(session, customer_id)
    settle = min(units, account.debt)
    # ON CONFLICT on the grant's unique key: the common case (a new grant) costs no lookup first, and a
    # concurrent twin waits for the first one and then finds it, instead of failing on the unique index.
    grant_id: int | None = run(
        session,
        _INSERT_GRANT[session.get_bind().dialect.name],
        {
            "account_id": account.id,
            "source": source,
            "units": units,
            "remaining": units - settle,
            "priority": priority,
            "expires_at": expires_at,
            "stripe_object_id": stripe_object_id,
            "stripe_object_type": stripe_object_type,
            "amount_minor": amount_minor,
            "currency": currency,
            "idempotency_key": idempotency_key,
            "reason": reason,
            "actor": actor,
            "period_start": period_start,
            "period_end": period_end,
        },
    ).scalar_one_or_none()
    if grant_id is None:
        original = run(session, _ORIGINAL_GRANT, {"key": entry_key}).one()
        if original.request_hash != digest:
            raise IdempotencyConflict(f"grant key {idempotency_key!r} was used with other parameters")
        return GrantResult(original.grant_id, customer_id, original.units, original.balance_after, replayed=True)
    _, balance_after = insert_entry(
        session,
        account,
        kind=EntryKind.GRANT,
        units=units,
        key=entry_key,
        request_hash=digest,
        grant_id=grant_id,
        stripe_object_id=stripe_object_id,
        actor=actor,
        reason=reason,
        allocations=[(grant_id, units)],
    )
    if settle:
        insert_entry(
            session,
            account,
            kind=EntryKind.DEBT_SETTLEMENT,
            units=0,
            debt_delta=-settle,
            key=f"settle:{idempotency_key}",
            grant_id=grant_id,
            actor=actor,
            reason="outstanding debt settled from a new grant",
            allocations=[(grant_id, -settle)],
        )
    save_account(session, account)
    _after_grant(session, customer_id)
    return GrantResult(grant_id, customer_id, units, balance_after, replayed=False)


def _after_grant(session: Session, customer_id: str) -> None:
    """A new grant may move the low-balance threshold (a share of the last grant, or a new plan's)."""
    config = get_billing_config()
    if any(p.low_balance_units is not None or p.low_balance_share is not None for p in config.plans):
        found = spendable(session, customer_id)
        if found is not None:
            plans = customer_plans(session, customer_id, utcnow(), config=config).plans
            refresh_threshold(session, found[0], plans, config=config)


def _grant_in_function(session: Session, customer_id: str, params: tuple[Any, ...]) -> GrantResult:
    """One round trip: ``ledger_grant`` applies :func:`grant_credits`' rules server-side (see migration 0006)."""
    units, digest, key = params[0], params[3], params[2]
    for attempt in range(2):
        status, grant_id, units, balance_after, original_hash = pgfast.call(
            session, _CALL, (customer_id, *params, utcnow())
        )
        if status != "unknown_customer" or attempt:
            break
        open_account(session, customer_id)
    if status == "unknown_customer":
        raise UnknownCustomer(customer_id)
    if status == "replay" and original_hash != digest:
        raise IdempotencyConflict(f"grant key {key!r} was used with other parameters")
    pgfast.forget_moved(session, [])  # the function moved the account's balance and debt
    return GrantResult(grant_id, customer_id, units, balance_after, replayed=status == "replay")


def find_grants_for_payment(session: Session, stripe_object_id: str) -> list[Grant]:
    """The grants a Stripe payment (payment intent, charge, invoice or checkout session) paid for."""
    return list(
        session.scalars(select(Grant).where(Grant.stripe_object_id == stripe_object_id).order_by(Grant.id)).all()
    )


def expire_grants(session: Session, *, now: datetime) -> int:
    """Expire every grant whose expiry has passed and that still has units; return how many grants expired."""
    now_utc = _aware("now", now)
    assert now_utc is not None
    account_ids = session.execute(
        select(GRANTS.c.account_id)
        .where(GRANTS.c.remaining > 0, GRANTS.c.expires_at.is_not(None), GRANTS.c.expires_at <= now_utc)
        .distinct()
        .order_by(GRANTS.c.account_id)
    ).scalars()
    expired = 0
    for account_id in list(account_ids):
        account = lock_account_by_id(session, account_id)
        _, lapsed = drawable_grants(session, account.id, now_utc)
        if lapsed:
            before = account.available
            expire_lapsed(session, account, lapsed, now_utc)
            save_account(session, account)
            note_balance(
                session,
                account_id=account.id,
                customer_id=account.customer_id,
                before=before,
                after=account.available,
                cause="credits.expired",
            )
            expired += len(lapsed)
    return expired
