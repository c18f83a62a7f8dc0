"""Usage suspensions: a customer's usage stopped (a usage spike on a plan with ``on_spike = "suspend"``) until a
reviewer resolves the review item that caused it. Consumption refuses while one is in force (see
:func:`ledger.limits.check_entitled`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Table, insert, select, update
from sqlalchemy.orm import Session

from ledger.models import UsageSuspension

SUSPENSIONS: Table = UsageSuspension.__table__  # type: ignore[assignment]


def suspend_usage(session: Session, customer_id: str, *, reason: str, review_item_id: int | None, now: datetime) -> int:
    """Suspend a customer's usage (idempotent per review item); return the suspension's id."""
    if review_item_id is not None:
        existing = session.execute(
            select(SUSPENSIONS.c.id).where(SUSPENSIONS.c.review_item_id == review_item_id)
        ).scalar_one_or_none()
        if existing is not None:
            return int(existing)
    new_id = session.execute(
        insert(SUSPENSIONS)
        .values(customer_id=customer_id, reason=reason, review_item_id=review_item_id, created_at=now)
        .returning(SUSPENSIONS.c.id)
    ).scalar_one()
    return int(new_id)


def lift_suspensions(session: Session, *, review_item_id: int, actor: str, note: str, now: datetime) -> int:
    """Lift the suspensions a review item caused, recording who lifted them and why; return how many."""
    result = session.execute(
        update(SUSPENSIONS)
        .where(SUSPENSIONS.c.review_item_id == review_item_id, SUSPENSIONS.c.lifted_at.is_(None))
        .values(lifted_at=now, lifted_by=actor, lift_note=note)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def suspensions_of(session: Session, customer_id: str) -> list[UsageSuspension]:
    """A customer's suspensions, newest first (the audit trail of who lifted which)."""
    return list(
        session.scalars(
            select(UsageSuspension)
            .where(UsageSuspension.customer_id == customer_id)
            .order_by(UsageSuspension.id.desc())
        )
    )
