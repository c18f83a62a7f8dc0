"""holds: why a hold was released, and the provider call it stood for (a provider timeout is kept for reconciliation).

Revision ID: client_1
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "client_1"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("holds") as batch:
        batch.add_column(sa.Column("release_reason", sa.String(64), nullable=True))
        batch.add_column(sa.Column("provider", sa.String(64), nullable=True))
        batch.add_column(sa.Column("model", sa.String(255), nullable=True))
        batch.add_column(sa.Column("provider_request_id", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("holds") as batch:
        batch.drop_column("provider_request_id")
        batch.drop_column("model")
        batch.drop_column("provider")
        batch.drop_column("release_reason")
