"""reconciliation runs, mismatches, their audit trail, and the per-run Stripe staging tables

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_NOW = sa.text("(CURRENT_TIMESTAMP)")
_STATUS = ("open", "resolved", "ignored", "closed")
_KINDS = (
    "payment_without_grant",
    "grant_without_payment",
    "amount_mismatch",
    "duplicate_grant",
    "refund_not_clawed_back",
    "dispute_not_applied",
    "access_state_drift",
    "unprocessed_event",
    "missed_event",
    "customer_total_mismatch",
    "provider_cost_drift",
    "provider_usage_drift",
    "negative_margin",
    "non_billable_production_usage",
)
_ACTIONS = ("detected", "resolve", "ignore", "reopen", "auto_close", "reappeared", "amounts_changed")


def _enum(values: tuple[str, ...], name: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, length=32)


def upgrade() -> None:
    op.create_table(
        "reconciliation_runs",
        sa.Column("id", _ID, nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", _enum(("running", "succeeded", "failed"), "reconciliation_run_status"), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("stats", sa.JSON(), nullable=False),
        sa.Column("provider_reports", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconciliation_runs")),
    )
    op.create_index("ix_reconciliation_runs_window", "reconciliation_runs", ["since", "until"], unique=False)
    op.create_table(
        "reconciliation_stripe_aliases",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("payment_id", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "key", name=op.f("pk_reconciliation_stripe_aliases")),
    )
    op.create_table(
        "reconciliation_stripe_objects",
        sa.Column("id", _ID, nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("object_type", sa.String(length=32), nullable=False),
        sa.Column("object_id", sa.String(length=255), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=True),
        sa.Column("ref", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=64), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=True),
        sa.Column("amount_refunded", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expected_credits", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconciliation_stripe_objects")),
    )
    op.create_index(
        "ix_reconciliation_stripe_objects_run_ref", "reconciliation_stripe_objects", ["run_id", "ref"], unique=False
    )
    op.create_index(
        "ix_reconciliation_stripe_objects_run_type_object",
        "reconciliation_stripe_objects",
        ["run_id", "object_type", "object_id"],
        unique=False,
    )
    op.create_table(
        "mismatches",
        sa.Column("id", _ID, nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("kind", _enum(_KINDS, "mismatch_kind"), nullable=False),
        sa.Column("status", _enum(_STATUS, "mismatch_status"), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("unit", sa.String(length=16), nullable=False),
        sa.Column("expected_amount", sa.Numeric(precision=30, scale=10), nullable=True),
        sa.Column("actual_amount", sa.Numeric(precision=30, scale=10), nullable=True),
        sa.Column("amounts_digest", sa.String(length=64), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("scope_key", sa.String(length=255), nullable=True),
        sa.Column("first_seen_run_id", _ID, nullable=False),
        sa.Column("last_seen_run_id", _ID, nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_NOW, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_NOW, nullable=False),
        sa.ForeignKeyConstraint(
            ["first_seen_run_id"],
            ["reconciliation_runs.id"],
            name=op.f("fk_mismatches_first_seen_run_id_reconciliation_runs"),
        ),
        sa.ForeignKeyConstraint(
            ["last_seen_run_id"],
            ["reconciliation_runs.id"],
            name=op.f("fk_mismatches_last_seen_run_id_reconciliation_runs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mismatches")),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_mismatches_fingerprint")),
    )
    op.create_index("ix_mismatches_customer_id", "mismatches", ["customer_id"], unique=False)
    op.create_index("ix_mismatches_last_seen_run_id", "mismatches", ["last_seen_run_id"], unique=False)
    op.create_index("ix_mismatches_occurred_at", "mismatches", ["occurred_at"], unique=False)
    op.create_index("ix_mismatches_status_kind", "mismatches", ["status", "kind"], unique=False)
    op.create_table(
        "mismatch_actions",
        sa.Column("id", _ID, nullable=False),
        sa.Column("mismatch_id", _ID, nullable=False),
        sa.Column("run_id", _ID, nullable=True),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("action", _enum(_ACTIONS, "mismatch_action"), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("from_status", _enum(_STATUS, "mismatch_status"), nullable=True),
        sa.Column("to_status", _enum(_STATUS, "mismatch_status"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["mismatch_id"], ["mismatches.id"], name=op.f("fk_mismatch_actions_mismatch_id_mismatches")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["reconciliation_runs.id"], name=op.f("fk_mismatch_actions_run_id_reconciliation_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mismatch_actions")),
    )
    op.create_index("ix_mismatch_actions_mismatch_id_id", "mismatch_actions", ["mismatch_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_mismatch_actions_mismatch_id_id", table_name="mismatch_actions")
    op.drop_table("mismatch_actions")
    op.drop_index("ix_mismatches_status_kind", table_name="mismatches")
    op.drop_index("ix_mismatches_occurred_at", table_name="mismatches")
    op.drop_index("ix_mismatches_last_seen_run_id", table_name="mismatches")
    op.drop_index("ix_mismatches_customer_id", table_name="mismatches")
    op.drop_table("mismatches")
    op.drop_index("ix_reconciliation_stripe_objects_run_type_object", table_name="reconciliation_stripe_objects")
    op.drop_index("ix_reconciliation_stripe_objects_run_ref", table_name="reconciliation_stripe_objects")
    op.drop_table("reconciliation_stripe_objects")
    op.drop_table("reconciliation_stripe_aliases")
    op.drop_index("ix_reconciliation_runs_window", table_name="reconciliation_runs")
    op.drop_table("reconciliation_runs")
