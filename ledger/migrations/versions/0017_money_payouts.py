"""payouts: each Stripe payout a reconciliation run saw, with its balance transactions' sums and tie-out.

Revision ID: money_2
Revises: limits_2
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "money_2"
down_revision = "limits_2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "payouts",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("arrival_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("transactions", sa.BigInteger(), nullable=False),
        sa.Column("net_minor", sa.BigInteger(), nullable=True),
        sa.Column("by_type", sa.JSON(), nullable=False),
        sa.Column("tie_out", sa.String(length=16), nullable=False),
        sa.Column("differences", sa.BigInteger(), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payouts")),
    )
    op.create_index("ix_payouts_created", "payouts", ["created"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_payouts_created", table_name="payouts")
    op.drop_table("payouts")
