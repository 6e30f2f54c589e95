"""Runs and checkpoints: listings, deletion, expiry, weights info and downloads of exported weights."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from skyrl_lora.api import schemas as S
from skyrl_lora.api.core import ServiceCore, expiry_of
from skyrl_lora.api.db import CheckpointRow, ModelRow, now
from skyrl_lora.api.expiry import aware, has_expired, live
from skyrl_lora.api.paths import CheckpointKind, TinkerPath
from skyrl_lora.errors import SkyrlError
from skyrl_lora.training.protocol import LoraSpec

logger = logging.getLogger(__name__)


class Checkpoints:
    def __init__(self, core: ServiceCore) -> None:
        self.core = core

    async def external_weights_urls(self, user: str, run_id: str, checkpoint_id: str,
                                    base_url: str) -> S.ExternalWeightsUrlsOut:
        path = TinkerPath.of(run_id, checkpoint_id)
        if path.kind != CheckpointKind.EXTERNAL:
            raise SkyrlError(400, f"checkpoint_id: '{checkpoint_id}' is a {path.kind} checkpoint; only external "
                                  "weights (save_weights_external) are downloadable", "checkpoint_id")
        row = await self.core.checkpoint(user, path, CheckpointKind.EXTERNAL, "checkpoint_id")
        files = await asyncio.to_thread(self.core.external.files, row.internal_path)
        urls, expires = self.core.external.signed_urls(base_url, path, files)
        return S.ExternalWeightsUrlsOut(urls=urls, expires=datetime.fromtimestamp(expires, tz=now().tzinfo))

    async def external_file(self, run_id: str, name: str, filename: str, expires: int, signature: str) -> Path:
        """The file a signed URL names (the signature is the authority: no API key comes with it)."""
        path = TinkerPath(run_id, CheckpointKind.EXTERNAL, name)
        self.core.external.check(path, filename, expires, signature)
        row = await self.core.db.run(lambda s: s.get(CheckpointRow, str(path)))
        if row is None or has_expired(row):
            raise SkyrlError(404, f"path: no checkpoint '{path}'", "path")
        if filename not in await asyncio.to_thread(self.core.external.files, row.internal_path):
            raise SkyrlError(404, f"file: '{filename}' is not in '{path}'", "file")
        return Path(row.internal_path) / filename

    async def set_checkpoint_ttl(self, user: str, run_id: str, checkpoint_id: str,
                                 ttl_seconds: int | None) -> S.EmptyOut:
        await self.core.model(user, run_id)
        path = TinkerPath.of(run_id, checkpoint_id)
        await self.core.checkpoint(user, path, None, "checkpoint_id")
        await self.core.db.run(lambda s: s.execute(update(CheckpointRow).where(CheckpointRow.tinker_path == str(path))
                                              .values(expires_at=expiry_of(ttl_seconds))))
        self.core.expiry.wake()
        return S.EmptyOut()

    def checkpoint_out(self, row: CheckpointRow) -> S.CheckpointOut:
        kind = CheckpointKind(row.kind)
        return S.CheckpointOut(checkpoint_id=f"{kind.segment}/{row.name}", checkpoint_type=kind, time=row.created,
                               tinker_path=row.tinker_path, size_bytes=row.size_bytes or None,
                               user_metadata=row.user_metadata or None,
                               expires_at=None if row.expires_at is None else aware(row.expires_at))

    async def training_run(self, user: str, model_id: str) -> S.TrainingRunOut:
        row = await self.core.model(user, model_id)

        def fn(s: Session) -> tuple[CheckpointRow | None, CheckpointRow | None]:
            def last(kind: str) -> CheckpointRow | None:
                return s.scalars(select(CheckpointRow).where(CheckpointRow.model_id == model_id, CheckpointRow.kind == kind,
                                                             live()).order_by(CheckpointRow.created.desc()).limit(1)).first()
            return last(CheckpointKind.TRAINING), last(CheckpointKind.SAMPLER)
        train, sampler = await self.core.db.run(fn)
        return S.TrainingRunOut(training_run_id=model_id, base_model=row.base_model, model_owner=user, lora_rank=row.rank,
                                last_request_time=row.last_request,
                                last_checkpoint=self.checkpoint_out(train) if train else None,
                                last_sampler_checkpoint=self.checkpoint_out(sampler) if sampler else None,
                                user_metadata={str(k): str(v) for k, v in (row.user_metadata or {}).items()} or None)

    async def training_runs(self, user: str, limit: int, offset: int) -> S.TrainingRunsOut:
        def fn(s: Session) -> tuple[list[str], int]:
            q = select(ModelRow.model_id).where(ModelRow.user_id == user).order_by(ModelRow.created)
            total = s.scalar(select(func.count()).select_from(ModelRow).where(ModelRow.user_id == user)) or 0
            return list(s.scalars(q.limit(limit).offset(offset)).all()), int(total)
        ids, total = await self.core.db.run(fn)
        runs = [await self.training_run(user, i) for i in ids]
        return S.TrainingRunsOut(training_runs=runs, cursor=S.CursorOut(offset=offset, limit=limit, total_count=total))

    async def checkpoints(self, user: str, model_id: str | None) -> S.CheckpointsOut:
        if model_id is not None:
            await self.core.model(user, model_id)

        def fn(s: Session) -> list[CheckpointRow]:
            q = select(CheckpointRow).where(CheckpointRow.user_id == user, CheckpointRow.ephemeral.is_(False), live())
            if model_id is not None:
                q = q.where(CheckpointRow.model_id == model_id)
            return list(s.scalars(q.order_by(CheckpointRow.created)).all())
        rows = await self.core.db.run(fn)
        return S.CheckpointsOut(checkpoints=[self.checkpoint_out(r) for r in rows])

    async def delete_checkpoint(self, user: str, model_id: str, checkpoint_id: str) -> S.EmptyOut:
        """The checkpoint's row and its files (a sampler export still being served stays until pruned)."""
        await self.core.model(user, model_id)
        row = await self.core.checkpoint(user, TinkerPath.of(model_id, checkpoint_id), None, "checkpoint_id")
        await self.core.remove_checkpoint_files(row)
        await self.core.db.run(lambda s: s.execute(delete(CheckpointRow).where(CheckpointRow.tinker_path == row.tinker_path)))
        return S.EmptyOut()

    async def weights_info(self, user: str, tinker_path: str) -> S.WeightsInfoOut:
        ckpt = await self.core.checkpoint(user, tinker_path, None, field="tinker_path")
        model = await self.core.db.run(lambda s: s.get(ModelRow, ckpt.model_id))
        spec = LoraSpec.model_validate(model.spec) if model else None
        return S.WeightsInfoOut(base_model=self.core.settings.served_name, lora_rank=spec.rank if spec else None,
                                train_mlp=bool(spec and "gate_proj" in spec.target_modules),
                                train_attn=bool(spec and "q_proj" in spec.target_modules),
                                train_unembed=bool(spec and "lm_head" in spec.target_modules))
