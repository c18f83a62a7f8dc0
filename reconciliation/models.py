"""Reconciliation runs, the mismatches they find, and the audit trail of what people did about them.

A mismatch is identified by a stable ``fingerprint`` (its kind and the identity of what disagrees, never the
amounts), so re-running a window updates the same row. ``amounts_digest`` covers the amounts: when it changes on
a resolved or ignored mismatch, the mismatch reopens. Every status change writes a :class:`MismatchAction`.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Numeric, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from ledger.db import Base, BigId
from ledger.models import _enum

# Amounts are minor units, credit units, tokens or USD with sub-cent precision: one exact type for all.
AmountType = Numeric(30, 10)


class MismatchKind(StrEnum):
    PAYMENT_WITHOUT_GRANT = "payment_without_grant"
    GRANT_WITHOUT_PAYMENT = "grant_without_payment"
    AMOUNT_MISMATCH = "amount_mismatch"
    DUPLICATE_GRANT = "duplicate_grant"
    REFUND_NOT_CLAWED_BACK = "refund_not_clawed_back"
    DISPUTE_NOT_APPLIED = "dispute_not_applied"
    ACCESS_STATE_DRIFT = "access_state_drift"
    UNPROCESSED_EVENT = "unprocessed_event"
    MISSED_EVENT = "missed_event"
    CUSTOMER_TOTAL_MISMATCH = "customer_total_mismatch"
    PROVIDER_COST_DRIFT = "provider_cost_drift"
    PROVIDER_USAGE_DRIFT = "provider_usage_drift"
    NEGATIVE_MARGIN = "negative_margin"
    NON_BILLABLE_PRODUCTION_USAGE = "non_billable_production_usage"
    # A refund or lost dispute clawed back credits the customer had already spent: recorded as debt.
    CLAWBACK_DEBT = "clawback_debt"
    # A paid change of plan or quantity whose credits are missing, or differ from the [plan_changes] policy.
    PLAN_CHANGE_NOT_APPLIED = "plan_change_not_applied"
    # A customer's or user's usage in the last hour far above its own baseline (spike detection, every 15 min).
    USAGE_SPIKE = "usage_spike"
    # An outbound notification endpoint failed for the whole retry horizon and was disabled.
    NOTIFICATION_ENDPOINT_DISABLED = "notification_endpoint_disabled"
    # Free credits (promotions, trials, $0 invoices) whose provider cost went past the billing config's allowance.
    FREE_CREDIT_COST = "free_credit_cost"
    # A succeeded charge whose balance transaction is missing or disagrees with it (amount, source, net, rate).
    BALANCE_TRANSACTION_MISMATCH = "balance_transaction_mismatch"
    # A payout whose transactions do not add up to it, or name a charge, refund or dispute the ledger never saw.
    PAYOUT_MISMATCH = "payout_mismatch"


class MismatchStatus(StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"
    IGNORED = "ignored"
    # No longer observed by a later run that covered it.
    CLOSED = "closed"


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    # Compared what it could read: some Stripe list could not be read, or a check stopped (the run says which).
    PARTIAL = "partial"
    FAILED = "failed"


class ActionKind(StrEnum):
    """What happened to a mismatch (the ``action`` column of the audit trail)."""

    DETECTED = "detected"
    RESOLVE = "resolve"
    IGNORE = "ignore"
    REOPEN = "reopen"
    # Automatic, by a run: the mismatch disappeared, reappeared, or its amounts changed.
    AUTO_CLOSE = "auto_close"
    REAPPEARED = "reappeared"
    AMOUNTS_CHANGED = "amounts_changed"


class ReconciliationRun(Base):
    """One reconciliation of a window [since, until): when it ran, how it ended, what it found."""

    __tablename__ = "reconciliation_runs"
    __table_args__ = (Index("ix_reconciliation_runs_window", "since", "until"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    since: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    until: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus, "reconciliation_run_status"), default=RunStatus.RUNNING)
    actor: Mapped[str] = mapped_column(String(255), default="system")
    # {kind: number of mismatches observed by this run}
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # What was compared: Stripe objects paged, ledger rows read, provider reports, and what changed.
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    provider_reports: Mapped[list[Any]] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text)


class Mismatch(Base):
    """One disagreement between the ledger and Stripe or a provider, with both sides' evidence."""

    __tablename__ = "mismatches"
    __table_args__ = (
        Index("ix_mismatches_status_kind", "status", "kind"),
        Index("ix_mismatches_customer_id", "customer_id"),
        Index("ix_mismatches_occurred_at", "occurred_at"),
        Index("ix_mismatches_last_seen_run_id", "last_seen_run_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[MismatchKind] = mapped_column(_enum(MismatchKind, "mismatch_kind"))
    status: Mapped[MismatchStatus] = mapped_column(
        _enum(MismatchStatus, "mismatch_status"), default=MismatchStatus.OPEN
    )
    customer_id: Mapped[str | None] = mapped_column(String(255))
    currency: Mapped[str | None] = mapped_column(String(3))
    # What the amounts count: minor (currency minor units), credits, usd, tokens, state, count.
    unit: Mapped[str] = mapped_column(String(16), default="minor")
    expected_amount: Mapped[Decimal | None] = mapped_column(AmountType)
    actual_amount: Mapped[Decimal | None] = mapped_column(AmountType)
    amounts_digest: Mapped[str] = mapped_column(String(64))
    summary: Mapped[str] = mapped_column(Text, default="")
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The time of what disagrees (a payment's creation, a provider day): which run windows cover it.
    # NULL for state checks (access state, stuck events) that every run covers whatever its window.
    occurred_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # For provider drift: "provider:YYYY-MM-DD", so only a run with that provider's report for that day closes it.
    scope_key: Mapped[str | None] = mapped_column(String(255))
    first_seen_run_id: Mapped[int] = mapped_column(ForeignKey("reconciliation_runs.id"))
    last_seen_run_id: Mapped[int] = mapped_column(ForeignKey("reconciliation_runs.id"))
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status_changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class MismatchAction(Base):
    """An audit row: who did what to a mismatch, when, why, and the status before and after."""

    __tablename__ = "mismatch_actions"
    __table_args__ = (Index("ix_mismatch_actions_mismatch_id_id", "mismatch_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    mismatch_id: Mapped[int] = mapped_column(ForeignKey("mismatches.id"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("reconciliation_runs.id"))
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[ActionKind] = mapped_column(_enum(ActionKind, "mismatch_action"))
    note: Mapped[str] = mapped_column(Text, default="")
    from_status: Mapped[MismatchStatus | None] = mapped_column(_enum(MismatchStatus, "mismatch_status"))
    to_status: Mapped[MismatchStatus] = mapped_column(_enum(MismatchStatus, "mismatch_status"))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StagedStripeObject(Base):
    """Stripe data paged in for one run, so the comparison with the ledger is a set-based join, not a dict in
    memory. Rows live only while their run does: the engine deletes them when the run ends."""

    __tablename__ = "reconciliation_stripe_objects"
    __table_args__ = (
        Index("ix_reconciliation_stripe_objects_run_type_object", "run_id", "object_type", "object_id"),
        Index("ix_reconciliation_stripe_objects_run_ref", "run_id", "ref"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(BigInteger)
    # payment (a paid checkout session or invoice), charge, refund, dispute, subscription, event
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str] = mapped_column(String(255))
    customer_id: Mapped[str | None] = mapped_column(String(255))
    # What the object pays for or refers to: a payment intent, invoice or charge id (resolved through aliases).
    ref: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str | None] = mapped_column(String(64))
    amount: Mapped[int | None] = mapped_column(BigInteger)
    amount_refunded: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(3))
    created: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expected_credits: Mapped[int | None] = mapped_column(BigInteger)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class StagedStripeAlias(Base):
    """Every Stripe id a ledger grant may carry for a payment (session, invoice, payment intent, charge),
    mapped to the payment's own id, for one run."""

    __tablename__ = "reconciliation_stripe_aliases"

    run_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    payment_id: Mapped[str] = mapped_column(String(255))


class Payout(Base):
    """A Stripe payout as the latest reconciliation run that covered it saw it: its money, status, arrival, the sum
    of its balance transactions by type, and whether they tie out to it. One row per payout, upserted by each run
    (re-running a window updates it, never duplicates it)."""

    __tablename__ = "payouts"
    __table_args__ = (Index("ix_payouts_created", "created"),)

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    # Stripe's status: pending, in_transit, paid, failed, canceled.
    status: Mapped[str] = mapped_column(String(32))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    arrival_date: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The balance transactions it paid out (its own "payout" transaction apart), and the sum of their nets.
    transactions: Mapped[int] = mapped_column(BigInteger, default=0)
    net_minor: Mapped[int | None] = mapped_column(BigInteger)
    # {type: {"count", "amount", "fee", "net"}} in minor units of ``currency`` (charge, refund, adjustment, ...).
    by_type: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # ties, differs (see ``differences`` and the run's payout_mismatch rows), or not_checked (failed, canceled).
    tie_out: Mapped[str] = mapped_column(String(16))
    differences: Mapped[int] = mapped_column(BigInteger, default=0)
    run_id: Mapped[int] = mapped_column(BigInteger)
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    checked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
