"""What every part of the Tinker service shares: settings, the database, futures, per-model ordering,
the trainer and inference clients, and the lookups that check who owns what."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timedelta
from pathlib import Path

from cachetools import LRUCache
from sqlalchemy import update
from sqlalchemy.orm import Session

from skyrl_lora.api.db import CheckpointRow, Database, ModelRow, SamplerRow, SessionRow, now
from skyrl_lora.api.expiry import CheckpointExpiry, has_expired
from skyrl_lora.api.external import ExternalWeightsStore
from skyrl_lora.api.futures import Futures
from skyrl_lora.api.idempotency import IdempotencyKeys
from skyrl_lora.api.ordering import ModelSequencer
from skyrl_lora.api.paths import CheckpointKind, TinkerPath
from skyrl_lora.api.settings import ApiSettings
from skyrl_lora.api.trainer_backend import TrainerBackend
from skyrl_lora.errors import SkyrlError, check_token_ids
from skyrl_lora.inference.client import FanOutError, InferenceError, RemoteInferenceClient

logger = logging.getLogger(__name__)


def _vocab_size(base_model: str) -> int | None:
    try:
        return int(json.loads((Path(base_model) / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_vocab(tokens: list[int], vocab: int | None, field: str) -> None:
    """Refuse token ids the model does not have at submit time (a 400 naming the field, not a failed future)."""
    if vocab is not None:
        check_token_ids(tokens, vocab, field)


def expiry_of(ttl_seconds: int | None) -> datetime | None:
    return None if ttl_seconds is None else now() + timedelta(seconds=ttl_seconds)


def inference_error(exc: BaseException) -> SkyrlError:
    if isinstance(exc, FanOutError):
        exc = next(iter(exc.errors.values()))
    if isinstance(exc, InferenceError):  # the server's 4xx (naming its field) is the caller's; the rest a 502
        return SkyrlError(exc.status, exc.message, exc.field) if exc.status < 500 else SkyrlError(502, exc.message, None)
    return SkyrlError(502, f"inference failed: {exc}", None)


class ServiceCore:
    def __init__(self, settings: ApiSettings, trainer: TrainerBackend, inference: RemoteInferenceClient,
                 db: Database) -> None:
        self.settings = settings
        self.trainer = trainer
        self.inference = inference
        self.db = db
        self.idempotency = IdempotencyKeys(db)
        self.futures = Futures(db, long_poll_s=settings.long_poll_s, retention_s=settings.future_retention_s,
                               also_prune=[self.idempotency.prune])
        self.external = ExternalWeightsStore(Path(settings.data_dir) / "external_weights", db.secret("download-urls"))
        self.expiry = CheckpointExpiry(db, self.remove_checkpoint_files)
        self.seq = ModelSequencer(turn_timeout_s=settings.turn_timeout_s, persist=self.persist_seq)
        # Sampler rows change only in the sampling part (created, or expired when pruned), so the hot
        # sample path reads them from memory; the database stays the durable copy for a restart.
        self.samplers: LRUCache[str, SamplerRow] = LRUCache(maxsize=100_000)
        self.vocab_size = _vocab_size(settings.base_model)

    async def session(self, user: str, session_id: str) -> SessionRow:
        row = await self.db.run(lambda s: s.get(SessionRow, session_id))
        if row is None or row.user_id != user:
            raise SkyrlError(404, f"session_id: no session '{session_id}'", "session_id")
        return row

    async def model(self, user: str, model_id: str) -> ModelRow:
        row = await self.db.run(lambda s: s.get(ModelRow, model_id))
        if row is None or row.user_id != user:  # another tenant's model does not exist for you
            raise SkyrlError(404, f"model_id: no model '{model_id}'", "model_id")
        if not self.seq.known(model_id):
            self.seq.start(model_id, row.next_seq)
        return row

    async def checkpoint(self, user: str, tinker_path: str | TinkerPath, kind: CheckpointKind | None,
                          field: str = "path") -> CheckpointRow:
        """The caller's checkpoint at ``tinker_path`` (of ``kind``, when given); 404 if it expired."""
        path = tinker_path if isinstance(tinker_path, TinkerPath) else TinkerPath.parse(tinker_path, field)
        if kind is not None and path.kind != kind:
            raise SkyrlError(400, f"{field}: '{path}' is a {path.kind} checkpoint; a {kind} checkpoint is needed", field)
        row = await self.db.run(lambda s: s.get(CheckpointRow, str(path)))
        if row is None or row.user_id != user or has_expired(row):
            raise SkyrlError(404, f"{field}: no checkpoint '{path}'", field)
        return row

    async def persist_seq(self, model_id: str, next_seq: int) -> None:
        await self.db.run(lambda s: s.execute(update(ModelRow).where(ModelRow.model_id == model_id)
                                              .values(next_seq=next_seq, last_request=now())))

    def check_base(self, base_model: str, field: str = "base_model") -> None:
        if base_model not in (self.settings.served_name, self.settings.base_model):
            raise SkyrlError(400, f"{field}: '{base_model}' is not served here (this service serves "
                                  f"'{self.settings.served_name}')", field)

    async def put_checkpoint(self, row: CheckpointRow) -> None:
        """Add (or replace) a checkpoint row; a replaced export's files go with it."""
        def fn(s: Session) -> CheckpointRow | None:
            old = s.get(CheckpointRow, row.tinker_path)
            if old is not None:
                s.delete(old)
                s.flush()
            s.add(row)
            return old
        old = await self.db.run(fn)
        if old is not None and old.kind == CheckpointKind.EXTERNAL and old.internal_path != row.internal_path:
            await asyncio.to_thread(self.external.remove, old.internal_path)
        if row.expires_at is not None:
            self.expiry.wake()

    async def record_checkpoint(self, user: str, path: TinkerPath, internal_path: str, *, ttl_seconds: int | None,
                                size_bytes: int = 0, ephemeral: bool = False,
                                user_metadata: dict[str, str] | None = None) -> None:
        """The row of a checkpoint just saved at ``path`` (its run is the model, its segment the kind)."""
        await self.put_checkpoint(CheckpointRow(
            tinker_path=str(path), model_id=path.run_id, user_id=user, kind=path.kind, name=path.name,
            internal_path=internal_path, size_bytes=size_bytes, ephemeral=ephemeral, user_metadata=user_metadata or {},
            expires_at=expiry_of(ttl_seconds)))

    async def remove_checkpoint_files(self, row: CheckpointRow) -> None:
        if row.kind == CheckpointKind.EXTERNAL:
            await asyncio.to_thread(self.external.remove, row.internal_path)
        else:
            await self.trainer.delete_checkpoint(row.internal_path)
