"""grant_settlements and refund_settlements: what each paid grant's charge (and each refund of it) settled as in
Stripe (amount, currency, rate, fee, net).

Revision ID: money_1
Revises: notify_1
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "money_1"
down_revision = "notify_1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "grant_settlements",
        sa.Column("grant_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("charge_id", sa.String(length=255), nullable=False),
        sa.Column("balance_transaction_id", sa.String(length=255), nullable=True),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("settlement_minor", sa.BigInteger(), nullable=False),
        sa.Column("settlement_currency", sa.String(length=3), nullable=False),
        sa.Column("exchange_rate", sa.Numeric(24, 12), nullable=True),
        sa.Column("fee_minor", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("net_minor", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["grant_id"], ["grants.id"], name="fk_grant_settlements_grant_id_grants"),
        sa.PrimaryKeyConstraint("grant_id", name="pk_grant_settlements"),
    )
    op.create_index("ix_grant_settlements_charge", "grant_settlements", ["charge_id"], unique=False)
    op.create_table(
        "refund_settlements",
        sa.Column("refund_id", sa.String(length=255), nullable=False),
        sa.Column("grant_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("charge_id", sa.String(length=255), nullable=False),
        sa.Column("balance_transaction_id", sa.String(length=255), nullable=True),
        sa.Column("refunded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("settlement_minor", sa.BigInteger(), nullable=False),
        sa.Column("settlement_currency", sa.String(length=3), nullable=False),
        sa.Column("exchange_rate", sa.Numeric(24, 12), nullable=True),
        sa.Column("fee_minor", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["grant_id"], ["grants.id"], name=op.f("fk_refund_settlements_grant_id_grants")),
        sa.PrimaryKeyConstraint("refund_id", name=op.f("pk_refund_settlements")),
    )
    op.create_index("ix_refund_settlements_grant", "refund_settlements", ["grant_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_refund_settlements_grant", table_name="refund_settlements")
    op.drop_table("refund_settlements")
    op.drop_index("ix_grant_settlements_charge", table_name="grant_settlements")
    op.drop_table("grant_settlements")
