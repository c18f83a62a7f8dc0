"""limits, outbox and notifications: limit counters, the transactional outbox, its delivery log and endpoint
health, low-balance thresholds and usage suspensions (usage spikes)

Revision ID: notify_1
Revises: 0007

Mirrors ledger.models (LimitCounter, OutboxEvent, NotificationDelivery, NotificationEndpointState,
BalanceThreshold, UsageSuspension). Tables only: nothing existing changes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "notify_1"
down_revision = "0007"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "limit_counters",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("limit_name", sa.String(100), nullable=False),
        sa.Column("scope_value", sa.String(600), nullable=False),
        sa.Column("window_start", _TS, nullable=False),
        sa.Column("window_end", _TS, nullable=False),
        sa.Column("requests", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("units", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cost_usd", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_limit_counters"),
        sa.UniqueConstraint("limit_name", "scope_value", "window_start", name="uq_limit_counters_key"),
    )
    op.create_index("ix_limit_counters_window_end", "limit_counters", ["window_end"])

    op.create_table(
        "outbox",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("event_id", sa.String(40), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("customer_id", sa.String(255)),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("dispatched_at", _TS),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("event_id", name="uq_outbox_event_id"),
    )
    op.create_index("ix_outbox_customer_id_id", "outbox", ["customer_id", "id"])
    op.create_index("ix_outbox_dispatched_at", "outbox", ["dispatched_at"])

    op.create_table(
        "notification_deliveries",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("outbox_id", _ID, nullable=False),
        sa.Column("endpoint_url", sa.String(2048), nullable=False),
        sa.Column("customer_id", sa.String(255)),
        sa.Column(
            "status",
            sa.Enum("pending", "succeeded", "failed", name="delivery_status", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", _TS, nullable=False),
        sa.Column("last_attempt_at", _TS),
        sa.Column("last_status_code", sa.Integer()),
        sa.Column("last_latency_ms", sa.Integer()),
        sa.Column("last_error", sa.Text()),
        sa.Column("delivered_at", _TS),
        sa.Column("created_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["outbox_id"], ["outbox.id"], name="fk_notification_deliveries_outbox_id_outbox"),
        sa.PrimaryKeyConstraint("id", name="pk_notification_deliveries"),
        sa.UniqueConstraint("outbox_id", "endpoint_url", name="uq_notification_deliveries_outbox_endpoint"),
    )
    op.create_index("ix_notification_deliveries_due", "notification_deliveries", ["status", "next_attempt_at"])
    op.create_index(
        "ix_notification_deliveries_order", "notification_deliveries", ["endpoint_url", "customer_id", "outbox_id"]
    )

    op.create_table(
        "notification_endpoints",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("failing_since", _TS),
        sa.Column("last_success_at", _TS),
        sa.Column("disabled_at", _TS),
        sa.Column("disabled_reason", sa.Text()),
        sa.PrimaryKeyConstraint("id", name="pk_notification_endpoints"),
        sa.UniqueConstraint("url", name="uq_notification_endpoints_url"),
    )

    op.create_table(
        "balance_thresholds",
        sa.Column("account_id", _ID, nullable=False),
        sa.Column("override_units", sa.BigInteger()),
        sa.Column("effective_units", sa.BigInteger()),
        sa.Column("updated_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_balance_thresholds_account_id_accounts"),
        sa.PrimaryKeyConstraint("account_id", name="pk_balance_thresholds"),
    )

    op.create_table(
        "usage_suspensions",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("customer_id", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("review_item_id", sa.BigInteger()),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("lifted_at", _TS),
        sa.Column("lifted_by", sa.String(255)),
        sa.Column("lift_note", sa.Text()),
        sa.PrimaryKeyConstraint("id", name="pk_usage_suspensions"),
    )
    op.create_index("ix_usage_suspensions_customer_id", "usage_suspensions", ["customer_id", "lifted_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_suspensions_customer_id", table_name="usage_suspensions")
    op.drop_table("usage_suspensions")
    op.drop_table("balance_thresholds")
    op.drop_table("notification_endpoints")
    op.drop_index("ix_notification_deliveries_order", table_name="notification_deliveries")
    op.drop_index("ix_notification_deliveries_due", table_name="notification_deliveries")
    op.drop_table("notification_deliveries")
    op.drop_index("ix_outbox_dispatched_at", table_name="outbox")
    op.drop_index("ix_outbox_customer_id_id", table_name="outbox")
    op.drop_table("outbox")
    op.drop_index("ix_limit_counters_window_end", table_name="limit_counters")
    op.drop_table("limit_counters")
