"""review_sessions and review_login_failures: sign-in sessions that sign-out ends on the server, and failed
sign-ins counted per name and client address, shared by every server process and kept across restarts.

Revision ID: ops_1
Revises: client_1
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "ops_1"
down_revision = "client_1"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "review_sessions",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name="pk_review_sessions"),
    )
    op.create_index("ix_review_sessions_username", "review_sessions", ["username"])
    op.create_index("ix_review_sessions_expires_at", "review_sessions", ["expires_at"])
    op.create_table(
        "review_login_failures",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("client_address", sa.String(64), nullable=False),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_review_login_failures"),
    )
    op.create_index(
        "ix_review_login_failures_name_address", "review_login_failures", ["username", "client_address", "failed_at"]
    )
    op.create_index("ix_review_login_failures_address", "review_login_failures", ["client_address", "failed_at"])


def downgrade() -> None:
    op.drop_table("review_login_failures")
    op.drop_table("review_sessions")
