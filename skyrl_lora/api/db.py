"""The service's metadata in a real database through SQLAlchemy: SQLite by default, PostgreSQL by URL.

Sessions, models (training runs), checkpoints, samplers, futures and hashed API keys survive a
restart. All database work runs on one worker thread (SQLite serialises writers anyway), so the
event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import (
    JSON,
    Boolean,
    CursorResult,
    DateTime,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Text,
    create_engine,
    event,
    inspect,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql.base import Executable

from skyrl_lora.background import BackgroundTasks

T = TypeVar("T")


def now() -> datetime:
    return datetime.now(UTC)


def hash_key(api_key: str) -> str:
    """Keys are stored only as SHA-256 digests; a leaked database does not leak keys."""
    return hashlib.sha256(api_key.encode()).hexdigest()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class SessionRow(Base):
    __tablename__ = "sessions"
    session_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    last_heartbeat: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    finished: Mapped[bool] = mapped_column(Boolean, default=False)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ModelRow(Base):
    __tablename__ = "models"
    model_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    session_id: Mapped[str] = mapped_column(String(64), index=True)
    tenant: Mapped[str] = mapped_column(String(128), unique=True)
    base_model: Mapped[str] = mapped_column(Text)
    rank: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    next_seq: Mapped[int] = mapped_column(Integer, default=1)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    last_request: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    tinker_path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(256), index=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # a CheckpointKind value
    name: Mapped[str] = mapped_column(String(256))
    internal_path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    ephemeral: Mapped[bool] = mapped_column(Boolean, default=False)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    # ttl_seconds: after this the checkpoint is gone from listings at once and from disk soon after
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)


class SamplerRow(Base):
    __tablename__ = "samplers"
    sampler_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    session_id: Mapped[str] = mapped_column(String(64), index=True)
    base_model: Mapped[str] = mapped_column(Text)
    model_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    lora_name: Mapped[str | None] = mapped_column(String(256), nullable=True)
    adapter_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    # made by save_weights_and_get_sampling_client: only a few of a model's are kept loaded
    ephemeral: Mapped[bool] = mapped_column(Boolean, default=False)
    # its pinned adapter was unloaded to make room (ephemeral ones only): asking for it is a 404
    expired: Mapped[bool] = mapped_column(Boolean, default=False)


class FutureRow(Base):
    __tablename__ = "futures"
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | complete | failed
    content_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    result: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    category: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    finished: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class IdempotencyRow(Base):
    """What a POST with an ``X-Idempotency-Key`` answered, so the SDK's retry of it gets the same future."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (PrimaryKeyConstraint("user_id", "key"),)
    user_id: Mapped[str] = mapped_column(String(128))
    key: Mapped[str] = mapped_column(String(256))
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of route and body
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now, index=True)


class SecretRow(Base):
    """Service secrets that must outlive a restart (the key that signs download URLs)."""

    __tablename__ = "secrets"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


MIGRATIONS = Path(__file__).parent / "migrations"


def upgrade(engine: Any) -> None:
    """Bring the schema to the newest revision (``migrations/``, Alembic). A database made before
    migrations existed (by ``create_all``: tables, no ``alembic_version``) is that first schema,
    revision 0001, and is stamped so before upgrading."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        tables = set(inspect(connection).get_table_names())
        if "alembic_version" not in tables and "futures" in tables:
            command.stamp(config, "0001")
        command.upgrade(config, "head")


class Database:
    def __init__(self, url: str) -> None:
        sqlite = url.startswith("sqlite")
        self.engine = create_engine(url, connect_args={"check_same_thread": False} if sqlite else {})
        if sqlite:
            @event.listens_for(self.engine, "connect")
            def _pragmas(conn: Any, _record: Any) -> None:  # concurrent readers, durable commits
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()
        upgrade(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skyrl-db")
        self._pending: list[tuple[Executable, dict[str, Any], asyncio.Future[None]]] = []
        self._flushing = False
        self._background = BackgroundTasks("database")

    async def run(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` in one transaction on the database thread."""
        def work() -> T:
            with self._sessions.begin() as session:
                return fn(session)

        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def execute(self, stmt: Executable, params: dict[str, Any] | None = None) -> None:
        """One statement in its own transaction on the database thread."""
        await self.run(lambda s: s.execute(stmt, [params] if params is not None else None))

    async def write(self, stmt: Executable, params: dict[str, Any]) -> None:
        """Group commit: writes that arrive while a commit is under way share the next one.

        Each caller still waits until its row is committed (a future id is only handed out once its row
        is durable). Writes of one batch that use the same prepared statement run as one executemany,
        so under load a hundred future rows cost one compiled statement and one transaction. Writes in
        one batch must not depend on each other: a caller awaits a write before it issues a dependent one.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((stmt, params, done))
        if not self._flushing:
            self._flushing = True
            self._background.spawn(self._flush(), name="db-group-commit")
        await done

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                groups: dict[int, tuple[Executable, list[dict[str, Any]]]] = {}
                for stmt, params, _ in batch:
                    groups.setdefault(id(stmt), (stmt, []))[1].append(params)

                def commit_all(groups: dict[int, tuple[Executable, list[dict[str, Any]]]] = groups) -> None:
                    with self._sessions.begin() as session:
                        for stmt, rows in groups.values():
                            session.execute(stmt, rows)
                try:
                    await loop.run_in_executor(self._executor, commit_all)
                except Exception:  # one bad write must not fail the others: commit them one by one
                    for stmt, params, done in batch:
                        try:
                            await self.execute(stmt, params)
                        except Exception as exc:
                            if not done.done():
                                done.set_exception(exc)
                        else:
                            if not done.done():
                                done.set_result(None)
                else:
                    for _, _, done in batch:
                        if not done.done():
                            done.set_result(None)
        finally:
            self._flushing = False

    def run_sync(self, fn: Callable[[Session], T]) -> T:
        with self._sessions.begin() as session:
            return fn(session)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()

    # ------------------------------------------------------------------ startup
    def register_keys(self, keys: dict[str, str]) -> None:
        def fn(s: Session) -> None:
            for key, user in keys.items():
                h = hash_key(key)
                row = s.get(ApiKeyRow, h)
                if row is None:
                    s.add(ApiKeyRow(key_hash=h, user_id=user))
                else:
                    row.user_id = user
        self.run_sync(fn)

    def fail_unfinished_futures(self) -> int:
        """Futures that were running when the service stopped are reported failed, never lost."""
        def fn(s: Session) -> int:
            result = s.execute(update(FutureRow).where(FutureRow.state == "pending").values(
                state="failed", category="server", finished=now(),
                error=json.dumps({"error": "the service restarted before this request finished; submit it again",
                                  "category": "server"})))
            return int(cast(CursorResult[Any], result).rowcount or 0)
        return self.run_sync(fn)

    def secret(self, name: str) -> str:
        """A random secret made on first use and kept in the database (the same after a restart)."""
        def fn(s: Session) -> str:
            row = s.get(SecretRow, name)
            if row is None:
                row = SecretRow(name=name, value=secrets.token_hex(32))
                s.add(row)
            return row.value
        return self.run_sync(fn)

    @staticmethod
    def user_for(s: Session, key_hash: str) -> str | None:
        row = s.execute(select(ApiKeyRow.user_id).where(ApiKeyRow.key_hash == key_hash)).first()
        return None if row is None else row[0]
