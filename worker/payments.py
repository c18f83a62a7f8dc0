"""Which grant a payment funded, the refunds counted against it, and the events waiting for a grant.

A refund or dispute names a charge or a payment intent, not our grant. Every Stripe id we learn for a paid
grant (payment intent, charge, invoice, checkout session) is linked to it here, so later events find it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import BindParameter, Connection, Table, bindparam, delete, func, select, update
from sqlalchemy.orm import Session

import ledger.clawback as ledger_clawback
from ledger.inbox import EventStatus, StripeEvent
from ledger.models import Grant
from ledger.posting import BACKENDS, for_each_backend, upsert
from worker.models import EventWait, GrantRefundState, PaymentLink, RefundRecord


@dataclass(frozen=True, slots=True)
class FundedGrant:
    """The grant a payment funded, as refunds and disputes need it."""

    id: int
    units: int
    amount_minor: int | None
    stripe_object_id: str | None


_LINKS: Table = PaymentLink.__table__  # type: ignore[assignment]
_GRANTS: Table = Grant.__table__  # type: ignore[assignment]
_EVENT_WAITS: Table = EventWait.__table__  # type: ignore[assignment]


@lru_cache(maxsize=32)
def _link_payment_statement(dialect_name: str, arity: int) -> Any:
    """One multi-row upsert of ``arity`` links, built once per backend and arity (an event names a few ids)."""
    rows: list[dict[str, Any]] = [
        {"object_id": bindparam(f"o{i}"), "grant_id": bindparam("grant"), "customer_id": bindparam("customer")}
        for i in range(arity)
    ]
    return BACKENDS[dialect_name].insert(_LINKS).values(rows).on_conflict_do_nothing(index_elements=["object_id"])


_FUNDED_COLUMNS = (_GRANTS.c.id, _GRANTS.c.units, _GRANTS.c.amount_minor, _GRANTS.c.stripe_object_id)


@lru_cache(maxsize=16)
def _funded_grant_statements(arity: int) -> tuple[Any, Any]:
    """The two lookups of :func:`find_funded_grant` for ``arity`` ids, built once per arity.

    One bind parameter per id (``IN (:id0, :id1, ...)``) rather than an expanding one, which SQLAlchemy would
    re-render on every call; an event names only a few ids, so there are only a few arities.
    """
    params: list[BindParameter[str]] = [bindparam(f"id{i}") for i in range(arity)]
    # The grant through its link, in one statement (not the link, then the grant).
    linked = (
        select(*_FUNDED_COLUMNS)
        .join(_LINKS, _LINKS.c.grant_id == _GRANTS.c.id)
        .where(_LINKS.c.object_id.in_(params))
        .limit(1)
    )
    # Grants made outside the worker (a manual grant naming its payment) have no links.
    named = select(*_FUNDED_COLUMNS).where(_GRANTS.c.stripe_object_id.in_(params)).order_by(_GRANTS.c.id).limit(1)
    return linked, named


def link_payment(session: Session, grant_id: int, customer_id: str, object_ids: Iterable[str | None]) -> set[str]:
    """Link Stripe ids to the grant their payment funded; return the ids (new or not)."""
    ids = {i for i in object_ids if i}
    if ids:
        conn = session.connection()
        params: dict[str, Any] = {f"o{i}": object_id for i, object_id in enumerate(sorted(ids))}
        params |= {"grant": grant_id, "customer": customer_id}
        conn.execute(_link_payment_statement(conn.dialect.name, len(ids)), params)
    return ids


def customers_of_payments(session: Session, object_ids: Iterable[str]) -> dict[str, str]:
    """The customer whose granted payment each of these Stripe ids belongs to (ids not linked are left out)."""
    ids = sorted(set(object_ids))
    if not ids:
        return {}
    rows = session.execute(select(PaymentLink.object_id, PaymentLink.customer_id).where(PaymentLink.object_id.in_(ids)))
    return {object_id: customer_id for object_id, customer_id in rows if customer_id}


def find_funded_grant(
    session: Session, object_ids: Iterable[str | None], *, unlinked: bool = True
) -> FundedGrant | None:
    """The grant funded by the payment any of these Stripe ids belongs to.

    ``unlinked=False`` looks only at the worker's links (enough to find a grant the worker made itself).
    """
    ids = [i for i in dict.fromkeys(object_ids) if i]
    if not ids:
        return None
    conn = session.connection()
    linked, named = _funded_grant_statements(len(ids))
    params = {f"id{i}": object_id for i, object_id in enumerate(ids)}
    row = conn.execute(linked, params).first()
    if row is None and unlinked:
        row = conn.execute(named, params).first()
    return FundedGrant(*row) if row is not None else None


# --- waiting events ---------------------------------------------------------------------------------------


def record_waits(session: Session, waits: Mapping[int, Iterable[str]]) -> None:
    """Remember which Stripe ids each waiting event needs a grant for (replacing what it waited for before)."""
    clear_waits(session, list(waits))
    rows = [{"event_row_id": e, "awaited_id": a} for e, ids in waits.items() for a in sorted({i for i in ids if i})]
    if rows:
        session.execute(
            upsert(session, _EVENT_WAITS)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["event_row_id", "awaited_id"])
        )


def clear_waits(session: Session, event_row_ids: Iterable[int]) -> None:
    """Forget what these events waited for (they ran, or wait for something else now)."""
    ids = list(event_row_ids)
    if ids:
        session.execute(delete(EventWait).where(EventWait.event_row_id.in_(ids)))


def events_waiting_for(session: Session, object_ids: Iterable[str]) -> list[int]:
    """Ids of waiting events whose prerequisite is one of these Stripe ids."""
    ids = sorted(set(object_ids))
    if not ids:
        return []
    stmt = (
        select(EventWait.event_row_id)
        .join(StripeEvent, StripeEvent.id == EventWait.event_row_id)
        .where(EventWait.awaited_id.in_(ids), StripeEvent.status == EventStatus.WAITING)
        .distinct()
    )
    return sorted(session.scalars(stmt))


# --- refunds ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RefundApplied:
    """What one refund event changed: the refunded total counted for the grant and the units clawed now."""

    refunded_minor: int
    # What the grant's payment was, in minor units (0 when unknown).
    paid_minor: int
    clawed_now: int
    clawed_total: int
    debt: int


_REFUND_STATES: Table = GrantRefundState.__table__  # type: ignore[assignment]
_REFUND_RECORDS: Table = RefundRecord.__table__  # type: ignore[assignment]


def _lock_refund_state_statement(dialect: Any) -> Any:
    # One upsert: creates the row for a grant's first refund and locks it either way (ON CONFLICT DO UPDATE
    # takes the row lock, like SELECT ... FOR UPDATE).
    stmt = dialect.insert(_REFUND_STATES).values(grant_id=bindparam("gid"), refunded_minor=0, clawed_units=0)
    return stmt.on_conflict_do_update(index_elements=["grant_id"], set_={"grant_id": stmt.excluded.grant_id}).returning(
        _REFUND_STATES.c.refunded_minor, _REFUND_STATES.c.clawed_units
    )


def _count_refund_statement(dialect: Any) -> Any:
    # A refund by id is counted once; a charge's cumulative amount is kept at its largest value seen.
    stmt = dialect.insert(_REFUND_RECORDS)
    table = _REFUND_RECORDS.c
    return stmt.on_conflict_do_update(
        index_elements=["grant_id", "refund_key"],
        set_={"amount_minor": stmt.excluded.amount_minor, "updated_at": func.now()},
        where=(stmt.excluded.kind == "charge") & (stmt.excluded.amount_minor > table.amount_minor),
    )


_LOCK_REFUND_STATE = for_each_backend(_lock_refund_state_statement)
_COUNT_REFUND = for_each_backend(_count_refund_statement)
_REFUNDED_BY_KIND = (
    select(_REFUND_RECORDS.c.kind, func.sum(_REFUND_RECORDS.c.amount_minor))
    .where(_REFUND_RECORDS.c.grant_id == bindparam("gid"))
    .group_by(_REFUND_RECORDS.c.kind)
)
_SAVE_REFUND_STATE = (
    update(_REFUND_STATES)
    .where(_REFUND_STATES.c.grant_id == bindparam("gid"))
    .values(refunded_minor=bindparam("new_refunded"), clawed_units=bindparam("new_clawed"))
)


def _refunded_total(conn: Connection, grant_id: int) -> int:
    sums = {kind: int(total or 0) for kind, total in conn.execute(_REFUNDED_BY_KIND, {"gid": grant_id})}
    # One refund can reach us as its own refund.created and inside its charge's cumulative amount_refunded:
    # both views count the same money, so take the larger one, never their sum.
    return max(sums.get("refund", 0), sums.get("charge", 0)) + sums.get("credit_note", 0)


def record_refund(
    session: Session,
    grant: FundedGrant,
    *,
    refund_key: str,
    kind: str,
    amount_minor: int,
    reason: str,
    stripe_object_id: str | None,
) -> RefundApplied:
    """Count a refund against a grant's payment and claw back the units for what is new, in proportion.

    ``kind="charge"`` carries a charge's cumulative ``amount_refunded`` (kept at its maximum); ``"refund"`` and
    ``"credit_note"`` carry one refund by its id. Whatever order and number of deliveries, the grant ends with
    ``units * refunded_total // amount_paid`` units clawed back.
    """
    conn = session.connection()
    dialect = conn.dialect.name
    refunded_before, clawed_before = conn.execute(_LOCK_REFUND_STATE[dialect], {"gid": grant.id}).one()
    conn.execute(
        _COUNT_REFUND[dialect],
        {"grant_id": grant.id, "refund_key": refund_key, "kind": kind, "amount_minor": amount_minor},
    )
    paid = grant.amount_minor or 0
    total = min(_refunded_total(conn, grant.id), paid) if paid > 0 else 0
    target = grant.units * total // paid if paid > 0 else 0
    clawed_now = 0
    debt = 0
    clawed_total = clawed_before
    if target > clawed_before:
        result = ledger_clawback.clawback(
            session,
            grant.id,
            units=target - clawed_before,
            # The cumulative target makes each step's key unique and a replayed step a no-op.
            idempotency_key=f"refund:{grant.id}:{target}",
            reason=reason,
            stripe_object_id=stripe_object_id,
        )
        clawed_now = result.clawed + result.debt
        debt = result.debt
        clawed_total = target
    refunded_total = max(refunded_before, total)
    if (refunded_total, clawed_total) != (refunded_before, clawed_before):
        conn.execute(_SAVE_REFUND_STATE, {"gid": grant.id, "new_refunded": refunded_total, "new_clawed": clawed_total})
    return RefundApplied(
        refunded_minor=total, paid_minor=paid, clawed_now=clawed_now, clawed_total=clawed_total, debt=debt
    )
