"""The review pages' own tables (sign-in sessions, failed sign-ins) and the indexes they need on other packages'
tables.

The indexes are declared here, beside the queries that use them, so the models and migration 0004 stay in step;
those tables belong to their packages. A session lives in the database (the signed cookie only names it), so
signing out ends it everywhere; failed sign-ins are counted there too, shared by every server process.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Index, Numeric, String, func, literal_column, text
from sqlalchemy.orm import Mapped, mapped_column

from ledger.db import Base, BigId
from ledger.inbox import StripeEvent
from ledger.models import Entry, Grant, UsageRecord
from reconciliation.models import Mismatch

# How far apart the two sides of a mismatch are, whichever is missing: what "sort by amount" sorts by.
gap_expr = func.abs(
    func.coalesce(Mismatch.actual_amount, literal_column("0"))
    - func.coalesce(Mismatch.expected_amount, literal_column("0")),
    type_=Numeric(30, 10),
)
amount_gap = gap_expr.label("amount_gap")

# --- ledger -----------------------------------------------------------------------------------------------------
# The customer page's ledger filtered by kind, newest first: WHERE account_id = ? AND kind = ? ORDER BY id DESC.
ix_review_entries_account_kind_id = Index("ix_review_entries_account_kind_id", Entry.account_id, Entry.kind, Entry.id)
# Finding the entry that explains a Stripe payment, refund or dispute by its object id.
ix_review_entries_stripe_object = Index("ix_review_entries_stripe_object", Entry.stripe_object_id)
# The customer page's debt history: the few entries that changed debt among a million that did not.
ix_review_entries_debt = Index(
    "ix_review_entries_debt",
    Entry.account_id,
    Entry.id,
    postgresql_where=text("debt_delta <> 0"),
    sqlite_where=text("debt_delta <> 0"),
)
# The runs chart: credits granted and provider cost per day over a window, Stripe payments per day.
ix_review_grants_created_at = Index("ix_review_grants_created_at", Grant.created_at)
ix_review_usage_occurred_at = Index("ix_review_usage_occurred_at", UsageRecord.occurred_at)
ix_review_stripe_events_type_created = Index(
    "ix_review_stripe_events_type_created", StripeEvent.type, StripeEvent.created
)

# --- mismatches -------------------------------------------------------------------------------------------------
# The list's keysets: (sort key, id), with and without the status tab in front.
ix_review_mismatches_seen = Index("ix_review_mismatches_seen", Mismatch.first_seen_at, Mismatch.id)
ix_review_mismatches_status_seen = Index(
    "ix_review_mismatches_status_seen", Mismatch.status, Mismatch.first_seen_at, Mismatch.id
)
ix_review_mismatches_gap = Index("ix_review_mismatches_gap", gap_expr, Mismatch.id)
ix_review_mismatches_status_gap = Index("ix_review_mismatches_status_gap", Mismatch.status, gap_expr, Mismatch.id)
# "New in run N" (the list's run filter with seen=first).
ix_review_mismatches_first_seen_run_id = Index("ix_review_mismatches_first_seen_run_id", Mismatch.first_seen_run_id)


# --- sign-in ------------------------------------------------------------------------------------------------------


class ReviewSession(Base):
    """A signed-in reviewer's session; the cookie carries a random token whose SHA-256 is the key."""

    __tablename__ = "review_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(255), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class ReviewLoginFailure(Base):
    """One failed sign-in, by name and client address (rows older than the throttle's window are deleted)."""

    __tablename__ = "review_login_failures"
    __table_args__ = (
        Index("ix_review_login_failures_name_address", "username", "client_address", "failed_at"),
        Index("ix_review_login_failures_address", "client_address", "failed_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(255))
    client_address: Mapped[str] = mapped_column(String(64))
    failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
