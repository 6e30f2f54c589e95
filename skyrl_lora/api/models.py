"""Sessions and models (training runs): creating them, their heartbeats, what the SDK asks of them."""

from __future__ import annotations

import uuid

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from skyrl_lora.api import schemas as S
from skyrl_lora.api.core import ServiceCore
from skyrl_lora.api.db import ModelRow, SamplerRow, SessionRow, now
from skyrl_lora.api.futures import Result, json_result
from skyrl_lora.errors import SkyrlError
from skyrl_lora.lora_targets import ATTENTION_MODULES, MLP_MODULES, UNEMBED_MODULES
from skyrl_lora.training.protocol import LoraSpec


class Models:
    def __init__(self, core: ServiceCore) -> None:
        self.core = core
        self.trainer = core.trainer

    async def create_session(self, user: str, req: S.CreateSessionIn) -> S.CreateSessionOut:
        session_id = f"sess-{uuid.uuid4().hex[:12]}"
        meta = dict(req.user_metadata or {})
        await self.core.db.run(lambda s: s.add(SessionRow(session_id=session_id, user_id=user, user_metadata=meta)))
        return S.CreateSessionOut(session_id=session_id)

    async def heartbeat(self, user: str, session_id: str) -> S.SessionHeartbeatOut:
        await self.core.session(user, session_id)
        await self.core.db.run(lambda s: s.execute(update(SessionRow).where(SessionRow.session_id == session_id)
                                              .values(last_heartbeat=now())))
        return S.SessionHeartbeatOut()

    async def finish_session(self, user: str, session_id: str) -> S.EmptyOut:
        await self.core.session(user, session_id)
        await self.core.db.run(lambda s: s.execute(update(SessionRow).where(SessionRow.session_id == session_id)
                                              .values(finished=True)))
        return S.EmptyOut()

    async def get_session(self, user: str, session_id: str) -> S.SessionOut:
        await self.core.session(user, session_id)

        def fn(s: Session) -> S.SessionOut:
            runs = s.scalars(select(ModelRow.model_id).where(ModelRow.session_id == session_id)).all()
            samplers = s.scalars(select(SamplerRow.sampler_id).where(SamplerRow.session_id == session_id)).all()
            return S.SessionOut(training_run_ids=list(runs), sampler_ids=list(samplers))
        return await self.core.db.run(fn)

    async def list_sessions(self, user: str) -> S.SessionsOut:
        mine = select(SessionRow.session_id).where(SessionRow.user_id == user)
        return S.SessionsOut(sessions=list(await self.core.db.run(lambda s: s.scalars(mine).all())))

    def capabilities(self) -> S.ServerCapabilitiesOut:
        settings = self.core.settings
        return S.ServerCapabilitiesOut(supported_models=[
            S.SupportedModelOut(model_name=settings.served_name, max_context_length=settings.max_context_length)])

    async def create_model(self, user: str, req: S.CreateModelIn) -> S.UntypedFuture:
        session = await self.core.session(user, req.session_id)
        self.core.check_base(req.base_model)
        cfg = req.lora_config
        targets = ((ATTENTION_MODULES if cfg.train_attn else ()) + (MLP_MODULES if cfg.train_mlp else ())
                   + (UNEMBED_MODULES if cfg.train_unembed else ()))
        if not targets:
            raise SkyrlError(400, "lora_config: one of train_attn, train_mlp or train_unembed must be true",
                             "lora_config")
        spec = LoraSpec(rank=cfg.rank, alpha=float(cfg.rank), target_modules=targets, seed=cfg.seed or 0)
        model_id = f"{session.session_id}:train:{req.model_seq_id}"
        meta = {str(k): str(v) for k, v in (req.user_metadata or {}).items()}

        async def work() -> Result:
            existing = await self.core.db.run(lambda s: s.get(ModelRow, model_id))
            if existing is not None:  # a retried create (same idempotent request): the model is already there
                if existing.user_id != user:
                    raise SkyrlError(409, f"model_seq_id: model '{model_id}' exists", "model_seq_id")
                return json_result({"model_id": model_id, "type": "create_model"})
            await self.new_model(user, session.session_id, model_id, spec, meta)
            return json_result({"model_id": model_id, "type": "create_model"})

        rid = await self.core.futures.submit(user, "CreateModel", model_id, work)
        return S.UntypedFuture(request_id=rid, model_id=model_id)

    async def new_model(self, user: str, session_id: str, model_id: str, spec: LoraSpec, meta: dict[str, str],
                         *, create_lora: bool = True) -> ModelRow:
        tenant = f"run-{uuid.uuid4().hex[:12]}"
        if create_lora:
            await self.trainer.create_lora(tenant, spec)
        row = ModelRow(model_id=model_id, user_id=user, session_id=session_id, tenant=tenant,
                       base_model=self.core.settings.served_name, rank=spec.rank, spec=spec.model_dump(mode="json"),
                       user_metadata=meta, next_seq=1)
        await self.core.db.run(lambda s: s.add(row))
        self.core.seq.start(model_id, 1)
        return row

    async def get_info(self, user: str, model_id: str) -> S.GetInfoOut:
        row = await self.core.model(user, model_id)
        settings = self.core.settings
        tokenizer = settings.base_model if ":" not in settings.base_model else None
        data = S.ModelDataOut(arch="llama", model_name=settings.served_name, tokenizer_id=tokenizer)
        return S.GetInfoOut(model_id=model_id, lora_rank=row.rank, model_name=settings.served_name, model_data=data)
