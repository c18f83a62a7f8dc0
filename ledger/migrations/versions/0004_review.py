"""review pages: indexes on other packages' tables for the review queries (no tables of its own)

Revision ID: 0004
Revises: 0003

Mirrors webhooks/review/models.py. Each index serves one page's query; see the comments there.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_GAP = "abs(coalesce(actual_amount, 0) - coalesce(expected_amount, 0))"


def upgrade() -> None:
    op.create_index("ix_review_entries_account_kind_id", "entries", ["account_id", "kind", "id"])
    op.create_index("ix_review_entries_stripe_object", "entries", ["stripe_object_id"])
    op.create_index(
        "ix_review_entries_debt",
        "entries",
        ["account_id", "id"],
        postgresql_where=sa.text("debt_delta <> 0"),
        sqlite_where=sa.text("debt_delta <> 0"),
    )
    op.create_index("ix_review_grants_created_at", "grants", ["created_at"])
    op.create_index("ix_review_usage_occurred_at", "usage_records", ["occurred_at"])
    op.create_index("ix_review_stripe_events_type_created", "stripe_events", ["type", "created"])
    op.create_index("ix_review_mismatches_seen", "mismatches", ["first_seen_at", "id"])
    op.create_index("ix_review_mismatches_status_seen", "mismatches", ["status", "first_seen_at", "id"])
    op.create_index("ix_review_mismatches_gap", "mismatches", [sa.text(_GAP), "id"])
    op.create_index("ix_review_mismatches_status_gap", "mismatches", ["status", sa.text(_GAP), "id"])
    op.create_index("ix_review_mismatches_first_seen_run_id", "mismatches", ["first_seen_run_id"])


def downgrade() -> None:
    for table, name in (
        ("mismatches", "ix_review_mismatches_first_seen_run_id"),
        ("mismatches", "ix_review_mismatches_status_gap"),
        ("mismatches", "ix_review_mismatches_gap"),
        ("mismatches", "ix_review_mismatches_status_seen"),
        ("mismatches", "ix_review_mismatches_seen"),
        ("stripe_events", "ix_review_stripe_events_type_created"),
        ("usage_records", "ix_review_usage_occurred_at"),
        ("grants", "ix_review_grants_created_at"),
        ("entries", "ix_review_entries_debt"),
        ("entries", "ix_review_entries_stripe_object"),
        ("entries", "ix_review_entries_account_kind_id"),
    ):
        op.drop_index(name, table_name=table)
