"""Indexes the review pages need on other packages' tables (the review package has no tables of its own).

Declared here, beside the queries that use them, so the models and migration 0004 stay in step; the tables
belong to their packages. Sessions are signed cookies, so nothing about logins is stored.
"""

from __future__ import annotations

from sqlalchemy import Index, Numeric, func, literal_column, text

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
