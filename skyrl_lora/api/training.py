"""Training requests: forward/backward, optimizer steps, saves and loads, each in its model's seq_id order."""

from __future__ import annotations

import asyncio
import logging
import uuid

from skyrl_lora.api import schemas as S
from skyrl_lora.api.core import ServiceCore, check_vocab
from skyrl_lora.api.db import ModelRow
from skyrl_lora.api.external import parse_recipients
from skyrl_lora.api.futures import Result, json_result
from skyrl_lora.api.models import Models
from skyrl_lora.api.paths import CheckpointKind, TinkerPath
from skyrl_lora.api.proto_conv import PROTO, decode_forward_backward, encode_forward_backward
from skyrl_lora.api.sampling import Sampling
from skyrl_lora.errors import SkyrlError
from skyrl_lora.training.protocol import LoraSpec

logger = logging.getLogger(__name__)


class Training:
    def __init__(self, core: ServiceCore, models: Models, sampling: Sampling) -> None:
        self.core = core
        self.trainer = core.trainer
        self.models = models
        self.sampling = sampling

    async def forward_backward(self, user: str, body: bytes) -> S.UntypedFuture:
        model_id, seq_id, data, loss_fn, config, forward_only = decode_forward_backward(body)
        row = await self.core.model(user, model_id)
        for i, d in enumerate(data):
            check_vocab(d.model_input, self.core.vocab_size, f"data[{i}].model_input")
            targets = d.loss_fn_inputs.get("target_tokens")
            if isinstance(targets, list) and targets and not isinstance(targets[0], list):
                check_vocab([int(t) for t in targets], self.core.vocab_size, f"data[{i}].loss_fn_inputs.target_tokens")
        kind = "Forward" if forward_only else "ForwardBackward"
        method = self.trainer.forward if forward_only else self.trainer.forward_backward

        async def work() -> Result:
            async with self.core.seq.turn(model_id, seq_id):
                out = await method(row.tenant, data, loss_fn, config)
            return Result(PROTO, encode_forward_backward(out))

        return S.UntypedFuture(request_id=await self.core.futures.submit(user, kind, model_id, work), model_id=model_id)

    async def optim_step(self, user: str, req: S.OptimStepIn) -> S.UntypedFuture:
        row = await self.core.model(user, req.model_id)
        if req.adam_params is None:
            raise SkyrlError(400, "adam_params: only AdamW is supported (optimizer_params given)", "adam_params")
        adam = req.adam_params

        async def work() -> Result:
            async with self.core.seq.turn(req.model_id, req.seq_id):
                out = await self.trainer.optim_step(row.tenant, adam)
            return json_result({"metrics": out.metrics, "type": "optim_step"})

        return S.UntypedFuture(request_id=await self.core.futures.submit(user, "OptimStep", req.model_id, work),
                               model_id=req.model_id)

    async def save_weights(self, user: str, req: S.SaveWeightsIn) -> S.UntypedFuture:
        row = await self.core.model(user, req.model_id)
        name = req.path or f"state-{req.seq_id or uuid.uuid4().hex[:8]}"
        path = TinkerPath(req.model_id, CheckpointKind.TRAINING, name)

        async def work() -> Result:
            async with self.core.seq.turn(req.model_id, req.seq_id):
                saved = await self.trainer.save_state(row.tenant, name)
            await self.core.record_checkpoint(user, path, saved.path, ttl_seconds=req.ttl_seconds, size_bytes=saved.nbytes,
                                              user_metadata=req.user_metadata)
            return json_result({"path": str(path), "type": "save_weights"})

        return S.UntypedFuture(request_id=await self.core.futures.submit(user, "SaveWeights", req.model_id, work),
                               model_id=req.model_id)

    async def save_weights_for_sampler(self, user: str, req: S.SaveWeightsForSamplerIn) -> S.UntypedFuture:
        row = await self.core.model(user, req.model_id)
        ephemeral = req.path is None
        if ephemeral and req.sampling_session_seq_id is None:
            raise SkyrlError(400, "path: give a name, or sampling_session_seq_id for an ephemeral sampler", "path")
        name = req.path or f"ephemeral-{req.sampling_session_seq_id}-{uuid.uuid4().hex[:6]}"
        path = TinkerPath(req.model_id, CheckpointKind.SAMPLER, name)
        tinker_path = str(path)

        async def work() -> Result:
            async with self.core.seq.turn(req.model_id, req.seq_id):
                # Exports the adapter and syncs the tenant's live LoRA on every server (only it pauses).
                sw = await self.trainer.save_weights_for_sampler(row.tenant, name)
            await self.core.record_checkpoint(user, path, sw.path, ttl_seconds=req.ttl_seconds, ephemeral=ephemeral,
                                              user_metadata=req.user_metadata)
            if not ephemeral:
                return json_result({"path": tinker_path, "type": "save_weights_for_sampler"})
            sampler_id = f"{row.session_id}:sample:{req.sampling_session_seq_id}"
            await self.sampling.new_sampler(user, row.session_id, sampler_id, row, tinker_path, sw.path, req.kind,
                                    ephemeral=True)
            return json_result({"sampling_session_id": sampler_id, "path": tinker_path, "type": "save_weights_for_sampler"})

        return S.UntypedFuture(request_id=await self.core.futures.submit(user, "SaveWeightsForSampler", req.model_id, work),
                               model_id=req.model_id)

    async def save_weights_external(self, user: str, req: S.SaveWeightsExternalIn) -> S.UntypedFuture:
        """The tenant's adapter as a peft directory for download (``weights.download``), age-encrypted
        to the given recipients. Ordered with the model's other requests, like every save."""
        row = await self.core.model(user, req.model_id)
        recipients = parse_recipients(req.age_encryption_recipients or [])
        path = TinkerPath(req.model_id, CheckpointKind.EXTERNAL, req.path)

        async def work() -> Result:
            async with self.core.seq.turn(req.model_id, req.seq_id):
                files = await self.trainer.adapter_files(row.tenant)
            stored = await asyncio.to_thread(self.core.external.write, files, recipients)
            try:
                await self.core.record_checkpoint(user, path, str(stored.directory), ttl_seconds=req.ttl_seconds,
                                                  size_bytes=stored.size_bytes)
            except BaseException:
                await asyncio.to_thread(self.core.external.remove, str(stored.directory))
                raise
            out = S.SaveWeightsExternalOut(path=str(path), size_bytes=stored.size_bytes)
            return json_result(out.model_dump(mode="json"))

        return S.UntypedFuture(request_id=await self.core.futures.submit(user, "SaveWeightsExternal", req.model_id, work),
                               model_id=req.model_id)

    async def load_weights(self, user: str, req: S.LoadWeightsIn) -> S.UntypedFuture:
        ckpt = await self.core.checkpoint(user, req.path, CheckpointKind.TRAINING)
        source = await self.core.db.run(lambda s: s.get(ModelRow, ckpt.model_id))
        if req.model_id is not None:
            target = req.model_id
            row = await self.core.model(user, target)

            async def work() -> Result:
                async with self.core.seq.turn(target, req.seq_id):
                    await self.trainer.load_state(row.tenant, ckpt.internal_path, req.optimizer)
                return json_result({"path": req.path, "model_id": target, "type": "load_weights"})

            return S.UntypedFuture(request_id=await self.core.futures.submit(user, "LoadWeights", target, work),
                                   model_id=target)
        if req.session_id is None or req.model_seq_id is None:
            raise SkyrlError(400, "model_id: give model_id, or session_id and model_seq_id to create a model", "model_id")
        session = await self.core.session(user, req.session_id)
        model_id = f"{session.session_id}:train:{req.model_seq_id}"
        spec = LoraSpec.model_validate(source.spec) if source is not None else None
        if spec is None:
            raise SkyrlError(404, f"path: the run of '{req.path}' is gone", "path")

        async def create() -> Result:
            row = await self.models.new_model(user, session.session_id, model_id, spec,
                                        {str(k): str(v) for k, v in (req.user_metadata or {}).items()}, create_lora=False)
            await self.trainer.load_state(row.tenant, ckpt.internal_path, req.optimizer)
            return json_result({"path": req.path, "model_id": model_id, "type": "load_weights"})

        return S.UntypedFuture(request_id=await self.core.futures.submit(user, "LoadWeights", model_id, create),
                               model_id=model_id)
