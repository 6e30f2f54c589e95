"""Checkpoint expiry (ttl_seconds), idempotency keys, the service's secrets, and explicit
ephemeral/expired sampler states (an expired sampler was once marked by the name "expired").

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


def upgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_checkpoints_expires_at", ["expires_at"])
    with op.batch_alter_table("samplers") as batch:
        batch.add_column(sa.Column("ephemeral", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("expired", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute("UPDATE samplers SET expired = TRUE WHERE lora_name = 'expired'")
    op.create_table("idempotency_keys", sa.Column("user_id", sa.String(128), nullable=False),
                    sa.Column("key", sa.String(256), nullable=False), sa.Column("fingerprint", sa.String(64), nullable=False),
                    sa.Column("response", sa.JSON(), nullable=False),
                    sa.Column("created", sa.DateTime(timezone=True), nullable=False),
                    sa.PrimaryKeyConstraint("user_id", "key"))
    op.create_index("ix_idempotency_keys_created", "idempotency_keys", ["created"])
    op.create_table("secrets", sa.Column("name", sa.String(64), primary_key=True),
                    sa.Column("value", sa.String(256), nullable=False))


def downgrade() -> None:
    op.drop_table("secrets")
    op.drop_table("idempotency_keys")
    with op.batch_alter_table("samplers") as batch:
        batch.drop_column("expired")
        batch.drop_column("ephemeral")
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_index("ix_checkpoints_expires_at")
        batch.drop_column("expires_at")
