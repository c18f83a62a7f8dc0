"""worker tables: per-object applied versions, payment links, refund records, event waits

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_now = sa.text("(CURRENT_TIMESTAMP)")


def upgrade() -> None:
    op.create_table(
        "worker_object_versions",
        sa.Column("object_id", sa.String(length=255), nullable=False),
        sa.Column("object_type", sa.String(length=64), nullable=False),
        sa.Column("applied_created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
        sa.PrimaryKeyConstraint("object_id", name=op.f("pk_worker_object_versions")),
    )
    op.create_table(
        "worker_payment_links",
        sa.Column("object_id", sa.String(length=255), nullable=False),
        sa.Column("grant_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
        sa.ForeignKeyConstraint(["grant_id"], ["grants.id"], name=op.f("fk_worker_payment_links_grant_id_grants")),
        sa.PrimaryKeyConstraint("object_id", name=op.f("pk_worker_payment_links")),
    )
    with op.batch_alter_table("worker_payment_links", schema=None) as batch_op:
        batch_op.create_index("ix_worker_payment_links_grant_id", ["grant_id"], unique=False)
    op.create_table(
        "worker_refund_records",
        sa.Column("grant_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("refund_key", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
        sa.ForeignKeyConstraint(["grant_id"], ["grants.id"], name=op.f("fk_worker_refund_records_grant_id_grants")),
        sa.PrimaryKeyConstraint("grant_id", "refund_key", name=op.f("pk_worker_refund_records")),
    )
    op.create_table(
        "worker_grant_refund_states",
        sa.Column("grant_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("refunded_minor", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("clawed_units", sa.BigInteger(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["grant_id"], ["grants.id"], name=op.f("fk_worker_grant_refund_states_grant_id_grants")
        ),
        sa.PrimaryKeyConstraint("grant_id", name=op.f("pk_worker_grant_refund_states")),
    )
    op.create_table(
        "worker_event_waits",
        sa.Column("event_row_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("awaited_id", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
        sa.ForeignKeyConstraint(
            ["event_row_id"],
            ["stripe_events.id"],
            name=op.f("fk_worker_event_waits_event_row_id_stripe_events"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("event_row_id", "awaited_id", name=op.f("pk_worker_event_waits")),
    )
    with op.batch_alter_table("worker_event_waits", schema=None) as batch_op:
        batch_op.create_index("ix_worker_event_waits_awaited_id", ["awaited_id"], unique=False)


def downgrade() -> None:
    op.drop_table("worker_event_waits")
    op.drop_table("worker_grant_refund_states")
    op.drop_table("worker_refund_records")
    op.drop_table("worker_payment_links")
    op.drop_table("worker_object_versions")
