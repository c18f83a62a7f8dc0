"""The transactional outbox: notifications to the product, written in the transaction of their cause.

:func:`emit` only inserts a row in the caller's transaction, so a rolled-back change leaves no notification and a
committed one always has its notification. The worker delivers the rows afterwards (at least once, signed).

Event types and what causes them:

``credits.granted``, ``credits.clawed_back``, ``credits.expired``: a grant, a clawback, an expiry.
``balance.low`` / ``balance.depleted``: the spendable balance crossed below the customer's threshold / to zero
(once per crossing: again only after the balance has gone back above). ``access.changed``: an access state
applied. ``limit.reached``: a usage limit's counter reached its maximum in its window. ``usage.spike``: a spike
review item opened. ``mismatch.opened``: reconciliation opened (or reopened) a review item.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from ledger.config import BillingConfig, get_billing_config
from ledger.errors import InvalidRequest, UnknownCustomer
from ledger.models import (
    BalanceThreshold,
    DeliveryStatus,
    Grant,
    NotificationDelivery,
    NotificationEndpointState,
    OutboxEvent,
)
from ledger.posting import ACCOUNTS, as_utc, run, upsert, utcnow

EVENT_TYPES = (
    "credits.granted",
    "credits.clawed_back",
    "credits.expired",
    "balance.low",
    "balance.depleted",
    "access.changed",
    "limit.reached",
    "usage.spike",
    "mismatch.opened",
)

OUTBOX: Table = OutboxEvent.__table__  # type: ignore[assignment]
THRESHOLDS: Table = BalanceThreshold.__table__  # type: ignore[assignment]
GRANTS: Table = Grant.__table__  # type: ignore[assignment]
DELIVERIES: Table = NotificationDelivery.__table__  # type: ignore[assignment]
ENDPOINTS: Table = NotificationEndpointState.__table__  # type: ignore[assignment]

_INSERT = insert(OUTBOX)
_EFFECTIVE = select(THRESHOLDS.c.effective_units).where(THRESHOLDS.c.account_id == bindparam("account_id"))
_ACCOUNT = select(ACCOUNTS.c.id, ACCOUNTS.c.balance, ACCOUNTS.c.overdraft_limit).where(
    ACCOUNTS.c.customer_id == bindparam("customer_id")
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    if isinstance(value, datetime):
        return as_utc(value).isoformat()  # type: ignore[union-attr]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def emit(session: Session, type: str, customer_id: str | None, data: dict[str, Any]) -> str:
    """Write a notification in the caller's transaction; return its public id (``evt_...``)."""
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown notification type {type!r}")
    event_id = f"evt_{uuid.uuid4().hex}"
    run(
        session,
        _INSERT,
        {
            "event_id": event_id,
            "type": type,
            "customer_id": customer_id,
            "data": _jsonable(data),
            "created_at": utcnow(),
        },
    )
    return event_id


# --- low balance ------------------------------------------------------------------------------------------------


def _plan_threshold(config: BillingConfig, plans: Sequence[str], last_grant_units: int | None) -> int | None:
    """The highest low-balance threshold among the customer's plans (units, or a share of the last grant)."""
    found: list[int] = []
    for price in plans:
        plan = config.plan_for_price(price)
        if plan is None:
            continue
        if plan.low_balance_units is not None:
            found.append(plan.low_balance_units)
        elif plan.low_balance_share is not None and last_grant_units:
            # Rounded up: a 10% threshold of 25 units warns at 3, never at 2.
            found.append(int(-(-plan.low_balance_share * last_grant_units // 1)))
    return max(found) if found else None


def refresh_threshold(
    session: Session, account_id: int, plans: Sequence[str], *, config: BillingConfig | None = None
) -> int | None:
    """Recompute the threshold in force for an account (after a grant or an override); return it."""
    config = config or get_billing_config()
    row = session.execute(select(THRESHOLDS.c.override_units).where(THRESHOLDS.c.account_id == account_id)).first()
    override = row.override_units if row is not None else None
    if override is not None:
        effective: int | None = override
    else:
        if not any(
            (p := config.plan_for_price(price)) is not None and p.low_balance_share is not None for price in plans
        ):
            last = None
        else:
            last = session.execute(
                select(GRANTS.c.units).where(GRANTS.c.account_id == account_id).order_by(GRANTS.c.id.desc()).limit(1)
            ).scalar_one_or_none()
        effective = _plan_threshold(config, plans, last)
    if row is None and effective is None:
        return None
    stmt = upsert(session, THRESHOLDS).values(
        account_id=account_id, override_units=override, effective_units=effective, updated_at=utcnow()
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["account_id"], set_={"effective_units": effective, "updated_at": utcnow()}
        )
    )
    return effective


def set_low_balance_threshold(
    session: Session, customer_id: str, units: int | None, *, plans: Sequence[str] = ()
) -> int | None:
    """Set (or with None, clear) a customer's own low-balance threshold in units; return the threshold in force."""
    if units is not None and (not isinstance(units, int) or isinstance(units, bool) or units < 0):
        raise InvalidRequest("threshold must be an integer >= 0 (or none to use the plan's)")
    found = spendable(session, customer_id)
    if found is None:
        raise UnknownCustomer(customer_id)
    account_id = found[0]
    session.execute(
        upsert(session, THRESHOLDS)
        .values(account_id=account_id, override_units=units, effective_units=units, updated_at=utcnow())
        .on_conflict_do_update(index_elements=["account_id"], set_={"override_units": units, "updated_at": utcnow()})
    )
    return refresh_threshold(session, account_id, plans)


@dataclass(frozen=True)
class BalanceCrossing:
    """What :func:`note_balance` emitted: the event types, in order."""

    emitted: tuple[str, ...]


def note_balance(
    session: Session,
    *,
    account_id: int,
    customer_id: str,
    before: int,
    after: int,
    cause: str,
    threshold: int | None = None,
) -> BalanceCrossing:
    """Emit ``balance.low`` / ``balance.depleted`` when a movement took the spendable balance across the line.

    ``before`` and ``after`` are the spendable balance (balance plus unused overdraft) around one movement,
    read under the account's lock, so crossings are seen once each: a balance that stays below emits nothing,
    and only one that went back above (a grant) can cross again. A rising balance costs nothing; a falling
    one reads the threshold in force (one primary-key read) unless the caller passes ``threshold``.
    """
    if after >= before:
        return BalanceCrossing(())
    emitted: list[str] = []
    if threshold is None:
        threshold = run(session, _EFFECTIVE, {"account_id": account_id}).scalar_one_or_none()
    data = {"balance_before": before, "balance": after, "cause": cause}
    if threshold is not None and after < threshold <= before:
        emit(session, "balance.low", customer_id, {**data, "threshold": threshold})
        emitted.append("balance.low")
    if after <= 0 < before:
        emit(session, "balance.depleted", customer_id, data)
        emitted.append("balance.depleted")
    return BalanceCrossing(tuple(emitted))


def balance_dropped(session: Session, customer_id: str, units: int, *, cause: str) -> BalanceCrossing:
    """After a movement that took ``units`` off a customer's balance (under its lock), emit any crossing."""
    if units <= 0:
        return BalanceCrossing(())
    row = run(session, _ACCOUNT, {"customer_id": customer_id}).first()
    if row is None:
        return BalanceCrossing(())
    before = max(0, row.balance + units + row.overdraft_limit)
    after = max(0, row.balance + row.overdraft_limit)
    return note_balance(session, account_id=row.id, customer_id=customer_id, before=before, after=after, cause=cause)


def spendable(session: Session, customer_id: str) -> tuple[int, int] | None:
    """(account id, spendable balance) of a customer, or None when there is no account."""
    row = run(session, _ACCOUNT, {"customer_id": customer_id}).first()
    if row is None:
        return None
    return row.id, max(0, row.balance + row.overdraft_limit)


def mark_dispatched(session: Session, outbox_ids: Sequence[int], now: datetime) -> None:
    """Record that these rows' deliveries exist (the worker's fan-out)."""
    if outbox_ids:
        session.execute(update(OUTBOX).where(OUTBOX.c.id.in_(list(outbox_ids))).values(dispatched_at=now))


# --- the delivery log (written by the worker) ---------------------------------------------------------------


def list_deliveries(
    session: Session, *, status: DeliveryStatus | None = None, customer_id: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """The delivery log, newest first, with each event's id and type (the CLI and the review page)."""
    query = (
        select(DELIVERIES, OUTBOX.c.event_id, OUTBOX.c.type)
        .join(OUTBOX, OUTBOX.c.id == DELIVERIES.c.outbox_id)
        .order_by(DELIVERIES.c.id.desc())
        .limit(limit)
    )
    if status is not None:
        query = query.where(DELIVERIES.c.status == status)
    if customer_id is not None:
        query = query.where(DELIVERIES.c.customer_id == customer_id)
    return [
        {
            "id": r.id,
            "event_id": r.event_id,
            "type": r.type,
            "customer_id": r.customer_id,
            "endpoint": r.endpoint_url,
            "status": DeliveryStatus(r.status).value,
            "attempts": r.attempts,
            "last_status_code": r.last_status_code,
            "last_latency_ms": r.last_latency_ms,
            "last_error": r.last_error,
            "next_attempt_at": _iso(r.next_attempt_at) if r.status == DeliveryStatus.PENDING else None,
            "delivered_at": _iso(r.delivered_at),
            "created_at": _iso(r.created_at),
        }
        for r in session.execute(query)
    ]


def _iso(value: datetime | None) -> str | None:
    utc = as_utc(value)
    return utc.isoformat() if utc is not None else None


def endpoint_states(session: Session) -> list[dict[str, Any]]:
    """Each endpoint the worker has tried: failing since, last success, disabled (and why)."""
    return [
        {
            "url": r.url,
            "failing_since": _iso(r.failing_since),
            "last_success_at": _iso(r.last_success_at),
            "disabled_at": _iso(r.disabled_at),
            "disabled_reason": r.disabled_reason,
        }
        for r in session.execute(select(ENDPOINTS).order_by(ENDPOINTS.c.url))
    ]
