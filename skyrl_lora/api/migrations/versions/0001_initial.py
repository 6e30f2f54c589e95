"""The schema as the first release made it (with create_all): keys, sessions, runs, checkpoints,
samplers, futures.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table("api_keys", sa.Column("key_hash", sa.String(64), primary_key=True),
                    sa.Column("user_id", sa.String(128), nullable=False), sa.Column("created", TS, nullable=False))
    op.create_index("ix_api_keys_user_id", "api_keys", ["user_id"])
    op.create_table("sessions", sa.Column("session_id", sa.String(64), primary_key=True),
                    sa.Column("user_id", sa.String(128), nullable=False), sa.Column("created", TS, nullable=False),
                    sa.Column("last_heartbeat", TS, nullable=False), sa.Column("finished", sa.Boolean(), nullable=False),
                    sa.Column("user_metadata", sa.JSON(), nullable=False))
    op.create_index("ix_sessions_user_id", "sessions", ["user_id"])
    op.create_table("models", sa.Column("model_id", sa.String(256), primary_key=True),
                    sa.Column("user_id", sa.String(128), nullable=False), sa.Column("session_id", sa.String(64), nullable=False),
                    sa.Column("tenant", sa.String(128), nullable=False, unique=True),
                    sa.Column("base_model", sa.Text(), nullable=False), sa.Column("rank", sa.Integer(), nullable=False),
                    sa.Column("spec", sa.JSON(), nullable=False), sa.Column("user_metadata", sa.JSON(), nullable=False),
                    sa.Column("next_seq", sa.Integer(), nullable=False), sa.Column("created", TS, nullable=False),
                    sa.Column("last_request", TS, nullable=False))
    op.create_index("ix_models_user_id", "models", ["user_id"])
    op.create_index("ix_models_session_id", "models", ["session_id"])
    op.create_table("checkpoints", sa.Column("tinker_path", sa.String(1024), primary_key=True),
                    sa.Column("model_id", sa.String(256), nullable=False), sa.Column("user_id", sa.String(128), nullable=False),
                    sa.Column("kind", sa.String(16), nullable=False), sa.Column("name", sa.String(256), nullable=False),
                    sa.Column("internal_path", sa.Text(), nullable=False), sa.Column("size_bytes", sa.Integer(), nullable=False),
                    sa.Column("ephemeral", sa.Boolean(), nullable=False), sa.Column("user_metadata", sa.JSON(), nullable=False),
                    sa.Column("created", TS, nullable=False))
    op.create_index("ix_checkpoints_model_id", "checkpoints", ["model_id"])
    op.create_index("ix_checkpoints_user_id", "checkpoints", ["user_id"])
    op.create_table("samplers", sa.Column("sampler_id", sa.String(256), primary_key=True),
                    sa.Column("user_id", sa.String(128), nullable=False), sa.Column("session_id", sa.String(64), nullable=False),
                    sa.Column("base_model", sa.Text(), nullable=False), sa.Column("model_path", sa.Text(), nullable=True),
                    sa.Column("lora_name", sa.String(256), nullable=True), sa.Column("adapter_path", sa.Text(), nullable=True),
                    sa.Column("created", TS, nullable=False))
    op.create_index("ix_samplers_user_id", "samplers", ["user_id"])
    op.create_index("ix_samplers_session_id", "samplers", ["session_id"])
    op.create_table("futures", sa.Column("request_id", sa.String(64), primary_key=True),
                    sa.Column("user_id", sa.String(128), nullable=False), sa.Column("kind", sa.String(64), nullable=False),
                    sa.Column("model_id", sa.String(256), nullable=True), sa.Column("state", sa.String(16), nullable=False),
                    sa.Column("content_type", sa.String(64), nullable=True), sa.Column("result", sa.LargeBinary(), nullable=True),
                    sa.Column("error", sa.Text(), nullable=True), sa.Column("category", sa.String(16), nullable=True),
                    sa.Column("created", TS, nullable=False), sa.Column("finished", TS, nullable=True))
    op.create_index("ix_futures_user_id", "futures", ["user_id"])


def downgrade() -> None:
    for table in ("futures", "samplers", "checkpoints", "models", "sessions", "api_keys"):
        op.drop_table(table)
