"""What each Tinker route does: ownership checks, database rows, trainer calls and sampling.

Training requests of one model run in ``seq_id`` order on the trainer actor. Sampling goes through
``RemoteInferenceClient.sample_with_retry``, so a tenant's weight sync never shows up as a failed or
truncated sample. Samplers are of two kinds, as in the SDK: ``inflight`` ones follow the tenant's
live adapter (every ``save_weights_for_sampler`` syncs it, pausing only that tenant, and in-flight
samples continue on the new weights), ``snapshot`` ones are pinned to the weights they were made
from (their own adapter in vLLM).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cachetools import LRUCache
from pydantic import ValidationError
from ray.exceptions import RayActorError
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from skyrl_lora.api import schemas as S
from skyrl_lora.api.db import CheckpointRow, Database, ModelRow, SamplerRow, SessionRow, hash_key, now
from skyrl_lora.api.expiry import CheckpointExpiry, aware, live
from skyrl_lora.api.external import ExternalWeightsStore, parse_recipients
from skyrl_lora.api.futures import Futures, Result, json_result
from skyrl_lora.api.idempotency import IdempotencyKeys
from skyrl_lora.api.ordering import ModelSequencer
from skyrl_lora.api.paths import CheckpointKind, TinkerPath
from skyrl_lora.api.proto_conv import PROTO, decode_forward_backward, encode_forward_backward, encode_sample_response
from skyrl_lora.api.settings import ApiSettings
from skyrl_lora.errors import SkyrlError, check_token_ids
from skyrl_lora.inference.client import FanOutError, InferenceError, RemoteInferenceClient
from skyrl_lora.inference.protocol import SamplingParamsIn
from skyrl_lora.lora_targets import ATTENTION_MODULES, MLP_MODULES
from skyrl_lora.training.protocol import LoraSpec

logger = logging.getLogger(__name__)


def _cause(exc: BaseException) -> BaseException:
    """Ray wraps an actor's exception; the SkyrlError inside carries the status and field."""
    inner = getattr(exc, "cause", None)
    return inner if isinstance(inner, BaseException) else exc


def _vocab_size(base_model: str) -> int | None:
    try:
        return int(json.loads((Path(base_model) / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_vocab(tokens: list[int], vocab: int | None, field: str) -> None:
    """Refuse token ids the model does not have at submit time (a 400 naming the field, not a failed future)."""
    if vocab is not None:
        check_token_ids(tokens, vocab, field)


def _expiry(ttl_seconds: int | None) -> datetime | None:
    return None if ttl_seconds is None else now() + timedelta(seconds=ttl_seconds)


def _inference_error(exc: BaseException) -> SkyrlError:
    if isinstance(exc, FanOutError):
        exc = next(iter(exc.errors.values()))
    if isinstance(exc, InferenceError):
        return SkyrlError(exc.status if exc.status < 500 else 502, exc.message, None)
    return SkyrlError(502, f"inference failed: {exc}", None)


class TinkerService:
    def __init__(self, settings: ApiSettings, trainer: Any, inference: RemoteInferenceClient, db: Database) -> None:
        self.settings = settings
        self.trainer = trainer
        self.inference = inference
        self.db = db
        self.idempotency = IdempotencyKeys(db)
        self.futures = Futures(db, long_poll_s=settings.long_poll_s, retention_s=settings.future_retention_s,
                               also_prune=[self.idempotency.prune])
        self.external = ExternalWeightsStore(Path(settings.data_dir) / "external_weights", db.secret("download-urls"))
        self.expiry = CheckpointExpiry(db, self._remove_checkpoint_files)
        self.seq = ModelSequencer(turn_timeout_s=settings.turn_timeout_s, persist=self._persist_seq)
        self._users: LRUCache = LRUCache(maxsize=10_000)  # api key -> user, valid keys only
        # Sampler rows change only here (created, or expired by _prune_pinned), so the hot sample path
        # reads them from memory; the database stays the durable copy for a restart.
        self._samplers: LRUCache = LRUCache(maxsize=100_000)
        self.vocab_size = _vocab_size(settings.base_model)
        self._said_unembed = False

    # ------------------------------------------------------------------ lifecycle
    def startup(self) -> None:
        self.db.register_keys(self.settings.api_keys)
        failed = self.db.fail_unfinished_futures()
        if failed:
            logger.warning("%d futures were running at the last shutdown; reported failed", failed)

    async def start(self) -> None:
        """Work that runs on the serving loop for the service's lifetime."""
        self.expiry.start()

    async def shutdown(self) -> None:
        await self.expiry.stop()
        await self.futures.close()
        await self.inference.aclose()

    async def authenticate(self, api_key: str | None) -> str:
        """The user of an ``X-API-Key`` (401 naming the header without a valid one). Found keys are
        remembered: keys come from settings and are never revoked while the service runs."""
        if not api_key:
            raise SkyrlError(401, "X-API-Key: missing", "X-API-Key")
        user = self._users.get(api_key)
        if user is None:
            digest = hash_key(api_key)
            user = await self.db.run(lambda s: Database.user_for(s, digest))
            if user is None:
                raise SkyrlError(401, "X-API-Key: not a valid key", "X-API-Key")
            self._users[api_key] = user
        return user

    # ------------------------------------------------------------------ helpers
    async def _session(self, user: str, session_id: str) -> SessionRow:
        row = await self.db.run(lambda s: s.get(SessionRow, session_id))
        if row is None or row.user_id != user:
            raise SkyrlError(404, f"session_id: no session '{session_id}'", "session_id")
        return row

    async def _model(self, user: str, model_id: str) -> ModelRow:
        row = await self.db.run(lambda s: s.get(ModelRow, model_id))
        if row is None or row.user_id != user:  # another tenant's model does not exist for you
            raise SkyrlError(404, f"model_id: no model '{model_id}'", "model_id")
        if not self.seq.known(model_id):
            self.seq.start(model_id, row.next_seq)
        return row

    async def _checkpoint(self, user: str, tinker_path: str | TinkerPath, kind: CheckpointKind | None,
                          field: str = "path") -> CheckpointRow:
        """The caller's checkpoint at ``tinker_path`` (of ``kind``, when given); 404 if it expired."""
        path = tinker_path if isinstance(tinker_path, TinkerPath) else TinkerPath.parse(tinker_path, field)
        if kind is not None and path.kind != kind:
            raise SkyrlError(400, f"{field}: '{path}' is a {path.kind} checkpoint; a {kind} checkpoint is needed", field)
        row = await self.db.run(lambda s: s.get(CheckpointRow, str(path)))
        if row is None or row.user_id != user or (row.expires_at is not None and aware(row.expires_at) <= now()):
            raise SkyrlError(404, f"{field}: no checkpoint '{path}'", field)
        return row

    async def _persist_seq(self, model_id: str, next_seq: int) -> None:
        await self.db.run(lambda s: s.execute(update(ModelRow).where(ModelRow.model_id == model_id)
                                              .values(next_seq=next_seq, last_request=now())))

    def _check_base(self, base_model: str, field: str = "base_model") -> None:
        if base_model not in (self.settings.served_name, self.settings.base_model):
            raise SkyrlError(400, f"{field}: '{base_model}' is not served here (this service serves "
                                  f"'{self.settings.served_name}')", field)

    async def _call(self, method: Any, *args: Any) -> Any:
        try:
            return await method.remote(*args)
        except RayActorError as exc:
            raise SkyrlError(503, "trainer: the training process stopped while this request ran; it restarts with "
                                  "each model's last saved state (save_state); submit the request again", None) from exc
        except Exception as exc:
            cause = _cause(exc)
            if isinstance(cause, SkyrlError):
                raise SkyrlError(cause.status, cause.message, cause.field) from exc
            raise

    # ------------------------------------------------------------------ sessions
    async def create_session(self, user: str, req: S.CreateSessionIn) -> S.CreateSessionOut:
        session_id = f"sess-{uuid.uuid4().hex[:12]}"
        meta = dict(req.user_metadata or {})
        await self.db.run(lambda s: s.add(SessionRow(session_id=session_id, user_id=user, user_metadata=meta)))
        return S.CreateSessionOut(session_id=session_id)

    async def heartbeat(self, user: str, session_id: str) -> dict:
        await self._session(user, session_id)
        await self.db.run(lambda s: s.execute(update(SessionRow).where(SessionRow.session_id == session_id)
                                              .values(last_heartbeat=now())))
        return {"type": "session_heartbeat"}

    async def finish_session(self, user: str, session_id: str) -> dict:
        await self._session(user, session_id)
        await self.db.run(lambda s: s.execute(update(SessionRow).where(SessionRow.session_id == session_id)
                                              .values(finished=True)))
        return {}

    async def get_session(self, user: str, session_id: str) -> dict:
        await self._session(user, session_id)

        def fn(s: Session) -> dict:
            runs = s.scalars(select(ModelRow.model_id).where(ModelRow.session_id == session_id)).all()
            samplers = s.scalars(select(SamplerRow.sampler_id).where(SamplerRow.session_id == session_id)).all()
            return {"training_run_ids": list(runs), "sampler_ids": list(samplers)}
        return await self.db.run(fn)

    async def list_sessions(self, user: str) -> dict:
        rows = await self.db.run(lambda s: s.scalars(select(SessionRow.session_id).where(SessionRow.user_id == user)).all())
        return {"sessions": list(rows)}

    def capabilities(self) -> dict:
        return {"supported_models": [{"model_name": self.settings.served_name, "trainable": True, "sampleable": True,
                                      "max_context_length": self.settings.max_context_length}]}

    # ------------------------------------------------------------------ models
    async def create_model(self, user: str, req: S.CreateModelIn) -> S.UntypedFuture:
        session = await self._session(user, req.session_id)
        self._check_base(req.base_model)
        cfg = req.lora_config
        targets = (ATTENTION_MODULES if cfg.train_attn else ()) + (MLP_MODULES if cfg.train_mlp else ())
        if not targets:
            raise SkyrlError(400, "lora_config: train_attn or train_mlp must be true", "lora_config")
        if cfg.train_unembed and not self._said_unembed:  # the SDK's default: say once that it is not done
            self._said_unembed = True
            logger.info("lora_config.train_unembed: LoRA on lm_head is not trained or served here (vLLM's lm_head "
                        "LoRA broke prompt logprobs); attention/MLP projections only (weights_info says so)")
        spec = LoraSpec(rank=cfg.rank, alpha=float(cfg.rank), target_modules=targets, seed=cfg.seed or 0)
        model_id = f"{session.session_id}:train:{req.model_seq_id}"
        meta = {str(k): str(v) for k, v in (req.user_metadata or {}).items()}

        async def work() -> Result:
            existing = await self.db.run(lambda s: s.get(ModelRow, model_id))
            if existing is not None:  # a retried create (same idempotent request): the model is already there
                if existing.user_id != user:
                    raise SkyrlError(409, f"model_seq_id: model '{model_id}' exists", "model_seq_id")
                return json_result({"model_id": model_id, "type": "create_model"})
            await self._new_model(user, session.session_id, model_id, spec, meta)
            return json_result({"model_id": model_id, "type": "create_model"})

        rid = await self.futures.submit(user, "CreateModel", model_id, work)
        return S.UntypedFuture(request_id=rid, model_id=model_id)

    async def _new_model(self, user: str, session_id: str, model_id: str, spec: LoraSpec, meta: dict[str, str],
                         *, create_lora: bool = True) -> ModelRow:
        tenant = f"run-{uuid.uuid4().hex[:12]}"
        if create_lora:
            await self._call(self.trainer.create_lora, tenant, spec)
        row = ModelRow(model_id=model_id, user_id=user, session_id=session_id, tenant=tenant,
                       base_model=self.settings.served_name, rank=spec.rank, spec=spec.model_dump(mode="json"),
                       user_metadata=meta, next_seq=1)
        await self.db.run(lambda s: s.add(row))
        self.seq.start(model_id, 1)
        return row

    async def get_info(self, user: str, model_id: str) -> dict:
        row = await self._model(user, model_id)
        tokenizer = self.settings.base_model if ":" not in self.settings.base_model else None
        return {"model_id": model_id, "type": "get_info", "is_lora": True, "lora_rank": row.rank,
                "model_name": self.settings.served_name,
                "model_data": {"arch": "llama", "model_name": self.settings.served_name, "tokenizer_id": tokenizer}}

    # ------------------------------------------------------------------ training
    async def forward_backward(self, user: str, body: bytes) -> S.UntypedFuture:
        model_id, seq_id, data, loss_fn, config, forward_only = decode_forward_backward(body)
        row = await self._model(user, model_id)
        for i, d in enumerate(data):
            check_vocab(d.model_input, self.vocab_size, f"data[{i}].model_input")
            targets = d.loss_fn_inputs.get("target_tokens")
            if isinstance(targets, list) and targets and not isinstance(targets[0], list):
                check_vocab([int(t) for t in targets], self.vocab_size, f"data[{i}].loss_fn_inputs.target_tokens")
        kind = "Forward" if forward_only else "ForwardBackward"
        method = self.trainer.forward if forward_only else self.trainer.forward_backward

        async def work() -> Result:
            async with self.seq.turn(model_id, seq_id):
                out = await self._call(method, row.tenant, data, loss_fn, config)
            return Result(PROTO, encode_forward_backward(out))

        return S.UntypedFuture(request_id=await self.futures.submit(user, kind, model_id, work), model_id=model_id)

    async def optim_step(self, user: str, req: S.OptimStepIn) -> S.UntypedFuture:
        row = await self._model(user, req.model_id)
        if req.adam_params is None:
            raise SkyrlError(400, "adam_params: only AdamW is supported (optimizer_params given)", "adam_params")
        adam = req.adam_params

        async def work() -> Result:
            async with self.seq.turn(req.model_id, req.seq_id):
                out = await self._call(self.trainer.optim_step, row.tenant, adam)
            return json_result({"metrics": out.metrics, "type": "optim_step"})

        return S.UntypedFuture(request_id=await self.futures.submit(user, "OptimStep", req.model_id, work),
                               model_id=req.model_id)

    async def save_weights(self, user: str, req: S.SaveWeightsIn) -> S.UntypedFuture:
        row = await self._model(user, req.model_id)
        name = req.path or f"state-{req.seq_id or uuid.uuid4().hex[:8]}"
        tinker_path = f"tinker://{req.model_id}/weights/{name}"

        async def work() -> Result:
            async with self.seq.turn(req.model_id, req.seq_id):
                saved = await self._call(self.trainer.save_state, row.tenant, name)
            await self._put_checkpoint(CheckpointRow(tinker_path=tinker_path, model_id=req.model_id, user_id=user,
                                                     kind=CheckpointKind.TRAINING, name=name, internal_path=saved.path,
                                                     size_bytes=saved.nbytes, user_metadata=req.user_metadata or {},
                                                     expires_at=_expiry(req.ttl_seconds)))
            return json_result({"path": tinker_path, "type": "save_weights"})

        return S.UntypedFuture(request_id=await self.futures.submit(user, "SaveWeights", req.model_id, work),
                               model_id=req.model_id)

    async def _put_checkpoint(self, row: CheckpointRow) -> None:
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

    async def _remove_checkpoint_files(self, row: CheckpointRow) -> None:
        if row.kind == CheckpointKind.EXTERNAL:
            await asyncio.to_thread(self.external.remove, row.internal_path)
        else:
            await self._call(self.trainer.delete_checkpoint, row.internal_path)

    async def save_weights_for_sampler(self, user: str, req: S.SaveWeightsForSamplerIn) -> S.UntypedFuture:
        row = await self._model(user, req.model_id)
        ephemeral = req.path is None
        if ephemeral and req.sampling_session_seq_id is None:
            raise SkyrlError(400, "path: give a name, or sampling_session_seq_id for an ephemeral sampler", "path")
        name = req.path or f"ephemeral-{req.sampling_session_seq_id}-{uuid.uuid4().hex[:6]}"
        tinker_path = f"tinker://{req.model_id}/sampler_weights/{name}"

        async def work() -> Result:
            async with self.seq.turn(req.model_id, req.seq_id):
                # Exports the adapter and syncs the tenant's live LoRA on every server (only it pauses).
                sw = await self._call(self.trainer.save_weights_for_sampler, row.tenant, name)
            await self._put_checkpoint(CheckpointRow(tinker_path=tinker_path, model_id=req.model_id, user_id=user,
                                                     kind=CheckpointKind.SAMPLER, name=name, internal_path=sw.path,
                                                     ephemeral=ephemeral, user_metadata=req.user_metadata or {},
                                                     expires_at=_expiry(req.ttl_seconds)))
            if not ephemeral:
                return json_result({"path": tinker_path, "type": "save_weights_for_sampler"})
            sampler_id = f"{row.session_id}:sample:{req.sampling_session_seq_id}"
            await self._new_sampler(user, row.session_id, sampler_id, row, tinker_path, sw.path, req.kind,
                                    ephemeral=True)
            return json_result({"sampling_session_id": sampler_id, "path": tinker_path, "type": "save_weights_for_sampler"})

        return S.UntypedFuture(request_id=await self.futures.submit(user, "SaveWeightsForSampler", req.model_id, work),
                               model_id=req.model_id)

    async def save_weights_external(self, user: str, req: S.SaveWeightsExternalIn) -> S.UntypedFuture:
        """The tenant's adapter as a peft directory for download (``weights.download``), age-encrypted
        to the given recipients. Ordered with the model's other requests, like every save."""
        row = await self._model(user, req.model_id)
        recipients = parse_recipients(req.age_encryption_recipients or [])
        path = TinkerPath(req.model_id, CheckpointKind.EXTERNAL, req.path)

        async def work() -> Result:
            async with self.seq.turn(req.model_id, req.seq_id):
                files = await self._call(self.trainer.adapter_files, row.tenant)
            stored = await asyncio.to_thread(self.external.write, files, recipients)
            try:
                await self._put_checkpoint(CheckpointRow(
                    tinker_path=str(path), model_id=req.model_id, user_id=user, kind=CheckpointKind.EXTERNAL,
                    name=req.path, internal_path=str(stored.directory), size_bytes=stored.size_bytes,
                    expires_at=_expiry(req.ttl_seconds)))
            except BaseException:
                await asyncio.to_thread(self.external.remove, str(stored.directory))
                raise
            out = S.SaveWeightsExternalOut(path=str(path), size_bytes=stored.size_bytes)
            return json_result(out.model_dump(mode="json"))

        return S.UntypedFuture(request_id=await self.futures.submit(user, "SaveWeightsExternal", req.model_id, work),
                               model_id=req.model_id)

    async def external_weights_urls(self, user: str, run_id: str, checkpoint_id: str,
                                    base_url: str) -> S.ExternalWeightsUrlsOut:
        path = TinkerPath.of(run_id, checkpoint_id)
        if path.kind != CheckpointKind.EXTERNAL:
            raise SkyrlError(400, f"checkpoint_id: '{checkpoint_id}' is a {path.kind} checkpoint; only external "
                                  "weights (save_weights_external) are downloadable", "checkpoint_id")
        row = await self._checkpoint(user, path, CheckpointKind.EXTERNAL, "checkpoint_id")
        files = await asyncio.to_thread(self.external.files, row.internal_path)
        urls, expires = self.external.signed_urls(base_url, path, files)
        return S.ExternalWeightsUrlsOut(urls=urls, expires=datetime.fromtimestamp(expires, tz=now().tzinfo))

    async def external_file(self, run_id: str, name: str, filename: str, expires: int, signature: str) -> Path:
        """The file a signed URL names (the signature is the authority: no API key comes with it)."""
        path = TinkerPath(run_id, CheckpointKind.EXTERNAL, name)
        self.external.check(path, filename, expires, signature)
        row = await self.db.run(lambda s: s.get(CheckpointRow, str(path)))
        if row is None or (row.expires_at is not None and aware(row.expires_at) <= now()):
            raise SkyrlError(404, f"path: no checkpoint '{path}'", "path")
        if filename not in await asyncio.to_thread(self.external.files, row.internal_path):
            raise SkyrlError(404, f"file: '{filename}' is not in '{path}'", "file")
        return Path(row.internal_path) / filename

    async def set_checkpoint_ttl(self, user: str, run_id: str, checkpoint_id: str, ttl_seconds: int | None) -> dict:
        await self._model(user, run_id)
        path = TinkerPath.of(run_id, checkpoint_id)
        await self._checkpoint(user, path, None, "checkpoint_id")
        await self.db.run(lambda s: s.execute(update(CheckpointRow).where(CheckpointRow.tinker_path == str(path))
                                              .values(expires_at=_expiry(ttl_seconds))))
        self.expiry.wake()
        return {}

    async def load_weights(self, user: str, req: S.LoadWeightsIn) -> S.UntypedFuture:
        ckpt = await self._checkpoint(user, req.path, CheckpointKind.TRAINING)
        source = await self.db.run(lambda s: s.get(ModelRow, ckpt.model_id))
        if req.model_id is not None:
            row = await self._model(user, req.model_id)

            async def work() -> Result:
                async with self.seq.turn(req.model_id, req.seq_id):
                    await self._call(self.trainer.load_state, row.tenant, ckpt.internal_path, req.optimizer)
                return json_result({"path": req.path, "model_id": req.model_id, "type": "load_weights"})

            return S.UntypedFuture(request_id=await self.futures.submit(user, "LoadWeights", req.model_id, work),
                                   model_id=req.model_id)
        if req.session_id is None or req.model_seq_id is None:
            raise SkyrlError(400, "model_id: give model_id, or session_id and model_seq_id to create a model", "model_id")
        session = await self._session(user, req.session_id)
        model_id = f"{session.session_id}:train:{req.model_seq_id}"
        spec = LoraSpec.model_validate(source.spec) if source is not None else None
        if spec is None:
            raise SkyrlError(404, f"path: the run of '{req.path}' is gone", "path")

        async def create() -> Result:
            row = await self._new_model(user, session.session_id, model_id, spec,
                                        {str(k): str(v) for k, v in (req.user_metadata or {}).items()}, create_lora=False)
            await self._call(self.trainer.load_state, row.tenant, ckpt.internal_path, req.optimizer)
            return json_result({"path": req.path, "model_id": model_id, "type": "load_weights"})

        return S.UntypedFuture(request_id=await self.futures.submit(user, "LoadWeights", model_id, create),
                               model_id=model_id)

    # ------------------------------------------------------------------ sampling
    async def _new_sampler(self, user: str, session_id: str, sampler_id: str, model: ModelRow | None,
                           model_path: str | None, adapter_path: str | None, kind: str, *,
                           ephemeral: bool = False) -> SamplerRow:
        lora_name: str | None = None
        if model is not None and adapter_path is not None:
            if kind == "inflight":
                lora_name = model.tenant  # the live adapter, synced on every save
            else:
                lora_name = f"{model.tenant}.{uuid.uuid4().hex[:8]}"  # pinned to these weights
                try:
                    await self.inference.load_lora_adapter(lora_name, adapter_path, load_inplace=False)
                except (FanOutError, InferenceError) as exc:
                    raise _inference_error(exc) from exc
        row = SamplerRow(sampler_id=sampler_id, user_id=user, session_id=session_id, base_model=self.settings.served_name,
                         model_path=model_path, lora_name=lora_name, adapter_path=adapter_path, ephemeral=ephemeral,
                         expired=False)

        def fn(s: Session) -> None:
            s.execute(delete(SamplerRow).where(SamplerRow.sampler_id == sampler_id))
            s.add(row)
        await self.db.run(fn)
        self._samplers[sampler_id] = row
        if model is not None and lora_name and lora_name != model.tenant:
            await self._prune_pinned(user, model)
        return row

    async def _prune_pinned(self, user: str, model: ModelRow) -> None:
        """Keep a bounded number of pinned snapshot adapters per model loaded (ephemeral ones only)."""
        prefix = model.tenant + "."

        def fn(s: Session) -> list[SamplerRow]:
            rows = s.scalars(select(SamplerRow).where(SamplerRow.user_id == user, SamplerRow.lora_name.startswith(prefix),
                                                      SamplerRow.ephemeral.is_(True), SamplerRow.expired.is_(False))
                             .order_by(SamplerRow.created.desc())).all()
            return list(rows[self.settings.keep_ephemeral_samplers:])
        for old in await self.db.run(fn):
            try:
                await self.inference.unload_lora_adapter(old.lora_name)
            except (FanOutError, InferenceError) as exc:
                logger.info("unloading %s: %s", old.lora_name, exc)
            self._samplers.pop(old.sampler_id, None)
            await self.db.run(lambda s, sid=old.sampler_id: s.execute(
                update(SamplerRow).where(SamplerRow.sampler_id == sid).values(expired=True)))

    async def create_sampling_session(self, user: str, req: S.CreateSamplingSessionIn) -> S.CreateSamplingSessionOut:
        await self._session(user, req.session_id)
        sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        if req.model_path:
            ckpt = await self._checkpoint(user, req.model_path, CheckpointKind.SAMPLER, field="model_path")
            model = await self.db.run(lambda s: s.get(ModelRow, ckpt.model_id))
            await self._new_sampler(user, req.session_id, sampler_id, model, req.model_path, ckpt.internal_path, "snapshot")
        else:
            self._check_base(req.base_model or "")
            await self._new_sampler(user, req.session_id, sampler_id, None, None, None, "snapshot")
        return S.CreateSamplingSessionOut(sampling_session_id=sampler_id)

    async def get_sampler(self, user: str, sampler_id: str) -> dict:
        row = await self._sampler(user, sampler_id)
        return {"sampler_id": row.sampler_id, "base_model": row.base_model, "model_path": row.model_path}

    async def _sampler(self, user: str, sampler_id: str) -> SamplerRow:
        row = self._samplers.get(sampler_id)
        if row is None:
            row = await self.db.run(lambda s: s.get(SamplerRow, sampler_id))
            if row is not None:
                self._samplers[sampler_id] = row
        if row is None or row.user_id != user:
            raise SkyrlError(404, f"sampling_session_id: no sampler '{sampler_id}'", "sampling_session_id")
        if row.expired:
            raise SkyrlError(404, f"sampling_session_id: sampler '{sampler_id}' expired; create a new one",
                             "sampling_session_id")
        return row

    def sampling_params(self, req: S.SampleIn, prompt_len: int) -> SamplingParamsIn:
        sp = req.sampling_params
        stops: list[str] = []
        stop_ids: list[int] = []
        ignore_eos = False
        if isinstance(sp.stop, str):
            stops = [sp.stop]
        elif isinstance(sp.stop, list):
            if not sp.stop:
                ignore_eos = True  # the SDK's [] means: no stop at all, EOS included
            elif all(isinstance(x, int) for x in sp.stop):
                stop_ids = [int(x) for x in sp.stop]
            else:
                stops = [str(x) for x in sp.stop]
        room = self.settings.max_context_length - prompt_len
        max_tokens = sp.max_tokens or min(self.settings.default_max_tokens, room)
        if max_tokens > room or room < 1:
            raise SkyrlError(400, f"sampling_params.max_tokens: prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds "
                                  f"the context length {self.settings.max_context_length}", "sampling_params.max_tokens")
        want_prompt = bool(req.prompt_logprobs)
        try:
            return SamplingParamsIn(max_tokens=max_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                                    seed=None if sp.seed is None else sp.seed % (2**63), stop=stops,
                                    stop_token_ids=stop_ids, ignore_eos=ignore_eos, logprobs=req.topk_sample_logprobs,
                                    prompt_logprobs=req.topk_prompt_logprobs if want_prompt else None)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = "sampling_params." + ".".join(str(x) for x in err["loc"])
            raise SkyrlError(400, f"{where}: {err['msg']}", where) from exc

    async def sample(self, user: str, req: S.SampleIn) -> S.UntypedFuture:
        if req.sampling_session_id:
            sampler = await self._sampler(user, req.sampling_session_id)
            lora = sampler.lora_name
        elif req.model_path:
            ckpt = await self._checkpoint(user, req.model_path, CheckpointKind.SAMPLER, field="model_path")
            model = await self.db.run(lambda s: s.get(ModelRow, ckpt.model_id))
            lora = model.tenant if model is not None else None
        else:
            self._check_base(req.base_model or "", "base_model")
            lora = None
        prompt = req.prompt.tokens()
        if not prompt:
            raise SkyrlError(400, "prompt: no tokens", "prompt")
        check_vocab(prompt, self.vocab_size, "prompt")
        params = self.sampling_params(req, len(prompt))
        check_vocab(params.stop_token_ids, self.vocab_size, "sampling_params.stop")
        seq = self.futures.new_id("seq")
        ids = [f"{seq}-{i}" for i in range(req.num_samples)]
        want_prompt = bool(req.prompt_logprobs)

        async def work() -> Result:
            try:
                samples = await self.inference.sample_with_retry(prompt, params, lora, req.num_samples)
            except (FanOutError, InferenceError) as exc:
                raise _inference_error(exc) from exc
            return Result(PROTO, encode_sample_response(samples, want_prompt_logprobs=want_prompt,
                                                        topk_prompt=req.topk_prompt_logprobs,
                                                        topk_sample=req.topk_sample_logprobs))

        rid = await self.futures.submit(user, "Sample", None, work)
        return S.UntypedFuture(request_id=rid, sample_sequence_ids=ids)

    # ------------------------------------------------------------------ runs and checkpoints
    def _checkpoint_out(self, row: CheckpointRow) -> S.CheckpointOut:
        kind = CheckpointKind(row.kind)
        return S.CheckpointOut(checkpoint_id=f"{kind.segment}/{row.name}", checkpoint_type=kind, time=row.created,
                               tinker_path=row.tinker_path, size_bytes=row.size_bytes or None,
                               user_metadata=row.user_metadata or None,
                               expires_at=None if row.expires_at is None else aware(row.expires_at))

    async def training_run(self, user: str, model_id: str) -> S.TrainingRunOut:
        row = await self._model(user, model_id)

        def fn(s: Session) -> tuple[CheckpointRow | None, CheckpointRow | None]:
            def last(kind: str) -> CheckpointRow | None:
                return s.scalars(select(CheckpointRow).where(CheckpointRow.model_id == model_id, CheckpointRow.kind == kind,
                                                             live()).order_by(CheckpointRow.created.desc()).limit(1)).first()
            return last(CheckpointKind.TRAINING), last(CheckpointKind.SAMPLER)
        train, sampler = await self.db.run(fn)
        return S.TrainingRunOut(training_run_id=model_id, base_model=row.base_model, model_owner=user, lora_rank=row.rank,
                                last_request_time=row.last_request,
                                last_checkpoint=self._checkpoint_out(train) if train else None,
                                last_sampler_checkpoint=self._checkpoint_out(sampler) if sampler else None,
                                user_metadata={str(k): str(v) for k, v in (row.user_metadata or {}).items()} or None)

    async def training_runs(self, user: str, limit: int, offset: int) -> dict:
        def fn(s: Session) -> tuple[list[str], int]:
            q = select(ModelRow.model_id).where(ModelRow.user_id == user).order_by(ModelRow.created)
            total = s.scalar(select(func.count()).select_from(ModelRow).where(ModelRow.user_id == user)) or 0
            return list(s.scalars(q.limit(limit).offset(offset)).all()), int(total)
        ids, total = await self.db.run(fn)
        runs = [(await self.training_run(user, i)).model_dump(mode="json") for i in ids]
        return {"training_runs": runs, "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    async def checkpoints(self, user: str, model_id: str | None) -> dict:
        if model_id is not None:
            await self._model(user, model_id)

        def fn(s: Session) -> list[CheckpointRow]:
            q = select(CheckpointRow).where(CheckpointRow.user_id == user, CheckpointRow.ephemeral.is_(False), live())
            if model_id is not None:
                q = q.where(CheckpointRow.model_id == model_id)
            return list(s.scalars(q.order_by(CheckpointRow.created)).all())
        rows = await self.db.run(fn)
        return {"checkpoints": [self._checkpoint_out(r).model_dump(mode="json") for r in rows]}

    async def delete_checkpoint(self, user: str, model_id: str, checkpoint_id: str) -> dict:
        """The checkpoint's row and its files (a sampler export still being served stays until pruned)."""
        await self._model(user, model_id)
        row = await self._checkpoint(user, TinkerPath.of(model_id, checkpoint_id), None, "checkpoint_id")
        await self._remove_checkpoint_files(row)
        await self.db.run(lambda s: s.execute(delete(CheckpointRow).where(CheckpointRow.tinker_path == row.tinker_path)))
        return {}

    async def weights_info(self, user: str, tinker_path: str) -> dict:
        ckpt = await self._checkpoint(user, tinker_path, None, field="tinker_path")
        model = await self.db.run(lambda s: s.get(ModelRow, ckpt.model_id))
        spec = LoraSpec.model_validate(model.spec) if model else None
        return {"base_model": self.settings.served_name, "is_lora": True, "lora_rank": spec.rank if spec else None,
                "train_mlp": bool(spec and "gate_proj" in spec.target_modules),
                "train_attn": bool(spec and "q_proj" in spec.target_modules), "train_unembed": False}
