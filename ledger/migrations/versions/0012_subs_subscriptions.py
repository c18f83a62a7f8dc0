"""subscriptions: each Stripe subscription's state and access, and the grants made for its periods.

Revision ID: subs_1
Revises: ops_1
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "subs_1"
down_revision = "ops_1"
branch_labels = None
depends_on = None

_ACCESS = sa.Enum(
    "active", "trialing", "past_due", "suspended", "canceled", name="access_state", native_enum=False, length=32
)


def upgrade() -> None:
    op.create_table(
        "subscriptions",
        sa.Column("subscription_id", sa.String(length=255), nullable=False),
        sa.Column("account_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("price", sa.String(length=255), nullable=True),
        sa.Column("quantity", sa.Integer(), server_default="1", nullable=False),
        sa.Column("current_period_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("current_period_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_at_period_end", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("cancel_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pause_collection", sa.String(length=32), nullable=True),
        sa.Column("trial_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("object_as_of", sa.DateTime(timezone=True), nullable=True),
        sa.Column("access_state", _ACCESS, server_default="active", nullable=False),
        sa.Column("grace_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("access_as_of", sa.DateTime(timezone=True), nullable=True),
        sa.Column("access_source", sa.String(length=255), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_subscriptions_account_id_accounts")),
        sa.PrimaryKeyConstraint("subscription_id", name=op.f("pk_subscriptions")),
    )
    op.create_index("ix_subscriptions_account_id", "subscriptions", ["account_id"])
    op.create_table(
        "subscription_grants",
        sa.Column("grant_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("subscription_id", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("effective_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("supersedes", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("superseded", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("invoice_id", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(["grant_id"], ["grants.id"], name=op.f("fk_subscription_grants_grant_id_grants")),
        sa.PrimaryKeyConstraint("grant_id", name=op.f("pk_subscription_grants")),
    )
    op.create_index("ix_subscription_grants_period", "subscription_grants", ["subscription_id", "period_end"])
    op.create_table(
        "subscription_reductions",
        sa.Column("change_key", sa.String(length=255), nullable=False),
        sa.Column("subscription_id", sa.String(length=255), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("effective_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        sa.Column("applied", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("change_key", name=op.f("pk_subscription_reductions")),
    )
    op.create_table(
        "subscription_reduction_takes",
        sa.Column("change_key", sa.String(length=255), nullable=False),
        sa.Column("grant_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        sa.Column("moves", sa.Integer(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["grant_id"], ["grants.id"], name=op.f("fk_subscription_reduction_takes_grant_id_grants")
        ),
        sa.PrimaryKeyConstraint("change_key", "grant_id", name=op.f("pk_subscription_reduction_takes")),
    )


def downgrade() -> None:
    op.drop_table("subscription_reduction_takes")
    op.drop_table("subscription_reductions")
    op.drop_index("ix_subscription_grants_period", table_name="subscription_grants")
    op.drop_table("subscription_grants")
    op.drop_index("ix_subscriptions_account_id", table_name="subscriptions")
    op.drop_table("subscriptions")
