"""Which grant a payment funded, the refunds counted against it, and the events waiting for a grant.

A refund or dispute names a charge or a payment intent, not our grant. Every Stripe id we learn for a paid
grant (payment intent, charge, invoice, checkout session) is linked to it here, so later events find it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

import ledger.clawback as ledger_clawback
from ledger import grants as ledger_grants
from ledger.inbox import EventStatus, StripeEvent
from ledger.models import Grant
from worker.models import EventWait, GrantRefundState, PaymentLink, RefundRecord


def _insert(session: Session, model: type[Any]) -> Any:
    return (postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert)(model)


def link_payment(session: Session, grant_id: int, customer_id: str, object_ids: Iterable[str | None]) -> set[str]:
    """Link Stripe ids to the grant their payment funded; return the ids (new or not)."""
    ids = {i for i in object_ids if i}
    if ids:
        session.execute(
            _insert(session, PaymentLink)
            .values([{"object_id": i, "grant_id": grant_id, "customer_id": customer_id} for i in sorted(ids)])
            .on_conflict_do_nothing(index_elements=["object_id"])
        )
    return ids


def customers_of_payments(session: Session, object_ids: Iterable[str]) -> dict[str, str]:
    """The customer whose granted payment each of these Stripe ids belongs to (ids not linked are left out)."""
    ids = sorted(set(object_ids))
    if not ids:
        return {}
    rows = session.execute(select(PaymentLink.object_id, PaymentLink.customer_id).where(PaymentLink.object_id.in_(ids)))
    return {object_id: customer_id for object_id, customer_id in rows if customer_id}


def find_funded_grant(session: Session, object_ids: Iterable[str | None], *, unlinked: bool = True) -> Grant | None:
    """The grant funded by the payment any of these Stripe ids belongs to.

    ``unlinked=False`` looks only at the worker's links (enough to find a grant the worker made itself).
    """
    ids = [i for i in dict.fromkeys(object_ids) if i]
    if not ids:
        return None
    # The grant through its link, in one statement (not the link, then the grant).
    linked = session.scalars(
        select(Grant).join(PaymentLink, PaymentLink.grant_id == Grant.id).where(PaymentLink.object_id.in_(ids)).limit(1)
    ).first()
    if linked is not None or not unlinked:
        return linked
    if len(ids) == 1:
        found = ledger_grants.find_grants_for_payment(session, ids[0])
        return found[0] if found else None
    # Grants made outside the worker (a manual grant naming its payment) have no links: one query for all ids.
    return session.scalars(select(Grant).where(Grant.stripe_object_id.in_(ids)).order_by(Grant.id).limit(1)).first()


# --- waiting events ---------------------------------------------------------------------------------------


def record_waits(session: Session, waits: Mapping[int, Iterable[str]]) -> None:
    """Remember which Stripe ids each waiting event needs a grant for (replacing what it waited for before)."""
    clear_waits(session, list(waits))
    rows = [{"event_row_id": e, "awaited_id": a} for e, ids in waits.items() for a in sorted({i for i in ids if i})]
    if rows:
        session.execute(
            _insert(session, EventWait)
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
    # What the grant's payment was (read before the clawback, which expires the grant's loaded copy).
    paid_minor: int
    clawed_now: int
    clawed_total: int
    debt: int


def _lock_refund_state(session: Session, grant_id: int) -> GrantRefundState:
    # One upsert: creates the row for a grant's first refund and locks it either way (ON CONFLICT DO UPDATE
    # takes the row lock, like SELECT ... FOR UPDATE).
    stmt = (
        _insert(session, GrantRefundState)
        .values(grant_id=grant_id, refunded_minor=0, clawed_units=0)
        .on_conflict_do_update(index_elements=["grant_id"], set_={"grant_id": grant_id})
        .returning(GrantRefundState)
    )
    state: GrantRefundState = session.scalars(stmt, execution_options={"populate_existing": True}).one()
    return state


def _refunded_total(session: Session, grant_id: int) -> int:
    rows = session.execute(
        select(RefundRecord.kind, func.sum(RefundRecord.amount_minor))
        .where(RefundRecord.grant_id == grant_id)
        .group_by(RefundRecord.kind)
    ).all()
    sums = {kind: int(total or 0) for kind, total in rows}
    # One refund can reach us as its own refund.created and inside its charge's cumulative amount_refunded:
    # both views count the same money, so take the larger one, never their sum.
    return max(sums.get("refund", 0), sums.get("charge", 0)) + sums.get("credit_note", 0)


def record_refund(
    session: Session,
    grant: Grant,
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
    state = _lock_refund_state(session, grant.id)
    existing = session.get(RefundRecord, (grant.id, refund_key))
    if existing is None:
        session.add(RefundRecord(grant_id=grant.id, refund_key=refund_key, kind=kind, amount_minor=amount_minor))
    elif kind == "charge" and amount_minor > existing.amount_minor:
        existing.amount_minor = amount_minor
    session.flush()
    paid = grant.amount_minor or 0
    total = min(_refunded_total(session, grant.id), paid) if paid > 0 else 0
    target = grant.units * total // paid if paid > 0 else 0
    clawed_now = 0
    debt = 0
    if target > state.clawed_units:
        result = ledger_clawback.clawback(
            session,
            grant.id,
            units=target - state.clawed_units,
            # The cumulative target makes each step's key unique and a replayed step a no-op.
            idempotency_key=f"refund:{grant.id}:{target}",
            reason=reason,
            stripe_object_id=stripe_object_id,
        )
        clawed_now = result.clawed + result.debt
        debt = result.debt
        state.clawed_units = target
    state.refunded_minor = max(state.refunded_minor, total)
    return RefundApplied(
        refunded_minor=total, paid_minor=paid, clawed_now=clawed_now, clawed_total=state.clawed_units, debt=debt
    )
