"""The worker's own tables: what it has applied per Stripe object, which payments funded which grants,
the refunds counted against each grant, and which stored events wait for which prerequisite.

The ledger owns money state; these tables only remember enough of Stripe's side to apply each event exactly
once in effect, whatever order Stripe delivers them in.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, String, func
from sqlalchemy.orm import Mapped, mapped_column

from ledger.db import Base


class ObjectVersion(Base):
    """The newest Stripe event applied for one Stripe object (a subscription, a dispute...).

    A state change applies only when its event is newer than this, so a late, older event never overwrites a
    newer state.
    """

    __tablename__ = "worker_object_versions"

    object_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    object_type: Mapped[str] = mapped_column(String(64))
    applied_created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    event_id: Mapped[str] = mapped_column(String(255))
    # The Stripe status that event carried (e.g. "active", "lost"): what "applied" means for this object.
    state: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class PaymentLink(Base):
    """A Stripe id (payment intent, charge, invoice, checkout session) that belongs to the payment of a grant.

    Refunds and disputes name a charge or a payment intent; this finds the grant they claw back from.
    """

    __tablename__ = "worker_payment_links"
    __table_args__ = (Index("ix_worker_payment_links_grant_id", "grant_id"),)

    object_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    grant_id: Mapped[int] = mapped_column(ForeignKey("grants.id"))
    customer_id: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class RefundRecord(Base):
    """One refund amount seen for a grant's payment, keyed so the same refund is never counted twice.

    ``kind`` is ``refund`` (one refund, by its id), ``charge`` (a charge's cumulative ``amount_refunded``, kept
    at its maximum) or ``credit_note`` (money returned out of band by a credit note).
    """

    __tablename__ = "worker_refund_records"

    grant_id: Mapped[int] = mapped_column(ForeignKey("grants.id"), primary_key=True)
    refund_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class GrantRefundState(Base):
    """Per grant: the refunded money counted so far and the units clawed back for it (the row is the lock)."""

    __tablename__ = "worker_grant_refund_states"

    grant_id: Mapped[int] = mapped_column(ForeignKey("grants.id"), primary_key=True)
    refunded_minor: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    clawed_units: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class EventWait(Base):
    """A stored event waiting for a prerequisite: the Stripe id whose grant it needs."""

    __tablename__ = "worker_event_waits"
    __table_args__ = (Index("ix_worker_event_waits_awaited_id", "awaited_id"),)

    event_row_id: Mapped[int] = mapped_column(ForeignKey("stripe_events.id", ondelete="CASCADE"), primary_key=True)
    awaited_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
