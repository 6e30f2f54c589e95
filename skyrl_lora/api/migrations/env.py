"""Alembic's entry point: runs the revisions on the connection ``skyrl_lora.api.db.upgrade`` hands it."""

from __future__ import annotations

from alembic import context

from skyrl_lora.api.db import Base

connection = context.config.attributes["connection"]
# SQLite cannot ALTER most things in place: batch mode rebuilds its tables where needed
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
