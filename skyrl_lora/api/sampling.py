"""Samplers and samples. ``inflight`` samplers follow the tenant's live adapter (every
``save_weights_for_sampler`` syncs it, pausing only that tenant, and in-flight samples continue on the
new weights); ``snapshot`` ones are pinned to the weights they were made from (their own adapter in
vLLM). Samples go through ``sample_with_retry``, so a sync never shows up as a failed or short sample."""

from __future__ import annotations

import logging
import uuid

from pydantic import ValidationError
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from skyrl_lora.api import schemas as S
from skyrl_lora.api.core import ServiceCore, check_vocab, inference_error
from skyrl_lora.api.db import ModelRow, SamplerRow
from skyrl_lora.api.futures import Result
from skyrl_lora.api.paths import CheckpointKind
from skyrl_lora.api.proto_conv import PROTO, encode_sample_response
from skyrl_lora.errors import SkyrlError
from skyrl_lora.inference.client import FanOutError, InferenceError
from skyrl_lora.inference.protocol import SamplingParamsIn

logger = logging.getLogger(__name__)


class Sampling:
    def __init__(self, core: ServiceCore) -> None:
        self.core = core

    async def new_sampler(self, user: str, session_id: str, sampler_id: str, model: ModelRow | None,
                           model_path: str | None, adapter_path: str | None, kind: str, *,
                           ephemeral: bool = False) -> SamplerRow:
        lora_name: str | None = None
        if model is not None and adapter_path is not None:
            if kind == "inflight":
                lora_name = model.tenant  # the live adapter, synced on every save
            else:
                lora_name = f"{model.tenant}.{uuid.uuid4().hex[:8]}"  # pinned to these weights
                await self.core.trainer.durable(adapter_path)  # a version just saved is copied there after the save
                try:
                    await self.core.inference.load_lora_adapter(lora_name, adapter_path, load_inplace=False)
                except (FanOutError, InferenceError) as exc:
                    raise inference_error(exc) from exc
        row = SamplerRow(sampler_id=sampler_id, user_id=user, session_id=session_id, base_model=self.core.settings.served_name,
                         model_path=model_path, lora_name=lora_name, adapter_path=adapter_path, ephemeral=ephemeral,
                         expired=False)

        def fn(s: Session) -> None:
            s.execute(delete(SamplerRow).where(SamplerRow.sampler_id == sampler_id))
            s.add(row)
        await self.core.db.run(fn)
        self.core.samplers[sampler_id] = row
        if model is not None and lora_name and lora_name != model.tenant:
            await self.prune_pinned(user, model)
        return row

    async def prune_pinned(self, user: str, model: ModelRow) -> None:
        """Keep a bounded number of pinned snapshot adapters per model loaded (ephemeral ones only)."""
        prefix = model.tenant + "."

        def fn(s: Session) -> list[SamplerRow]:
            rows = s.scalars(select(SamplerRow).where(SamplerRow.user_id == user, SamplerRow.lora_name.startswith(prefix),
                                                      SamplerRow.ephemeral.is_(True), SamplerRow.expired.is_(False))
                             .order_by(SamplerRow.created.desc())).all()
            return list(rows[self.core.settings.keep_ephemeral_samplers:])
        for old in await self.core.db.run(fn):
            try:
                await self.core.inference.unload_lora_adapter(old.lora_name or "")
            except (FanOutError, InferenceError) as exc:
                logger.info("unloading %s: %s", old.lora_name, exc)
            self.core.samplers.pop(old.sampler_id, None)
            expire = update(SamplerRow).where(SamplerRow.sampler_id == old.sampler_id).values(expired=True)
            await self.core.db.execute(expire)

    async def create_sampling_session(self, user: str, req: S.CreateSamplingSessionIn) -> S.CreateSamplingSessionOut:
        await self.core.session(user, req.session_id)
        sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        if req.model_path:
            ckpt = await self.core.checkpoint(user, req.model_path, CheckpointKind.SAMPLER, field="model_path")
            model = await self.core.db.run(lambda s: s.get(ModelRow, ckpt.model_id))
            await self.new_sampler(user, req.session_id, sampler_id, model, req.model_path, ckpt.internal_path, "snapshot")
        else:
            self.core.check_base(req.base_model or "")
            await self.new_sampler(user, req.session_id, sampler_id, None, None, None, "snapshot")
        return S.CreateSamplingSessionOut(sampling_session_id=sampler_id)

    async def get_sampler(self, user: str, sampler_id: str) -> S.SamplerOut:
        row = await self.sampler(user, sampler_id)
        return S.SamplerOut(sampler_id=row.sampler_id, base_model=row.base_model, model_path=row.model_path)

    async def sampler(self, user: str, sampler_id: str) -> SamplerRow:
        row = self.core.samplers.get(sampler_id)
        if row is None:
            row = await self.core.db.run(lambda s: s.get(SamplerRow, sampler_id))
            if row is not None:
                self.core.samplers[sampler_id] = row
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
        room = self.core.settings.max_context_length - prompt_len
        max_tokens = sp.max_tokens or min(self.core.settings.default_max_tokens, room)
        if max_tokens > room or room < 1:
            raise SkyrlError(400, f"sampling_params.max_tokens: prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds "
                                  f"the context length {self.core.settings.max_context_length}", "sampling_params.max_tokens")
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
            sampler = await self.sampler(user, req.sampling_session_id)
            lora = sampler.lora_name
        elif req.model_path:
            ckpt = await self.core.checkpoint(user, req.model_path, CheckpointKind.SAMPLER, field="model_path")
            model = await self.core.db.run(lambda s: s.get(ModelRow, ckpt.model_id))
            lora = model.tenant if model is not None else None
        else:
            self.core.check_base(req.base_model or "", "base_model")
            lora = None
        prompt = req.prompt.tokens()
        if not prompt:
            raise SkyrlError(400, "prompt: no tokens", "prompt")
        check_vocab(prompt, self.core.vocab_size, "prompt")
        params = self.sampling_params(req, len(prompt))
        check_vocab(params.stop_token_ids, self.core.vocab_size, "sampling_params.stop")
        seq = self.core.futures.new_id("seq")
        ids = [f"{seq}-{i}" for i in range(req.num_samples)]
        want_prompt = bool(req.prompt_logprobs)

        async def work() -> Result:
            try:
                samples = await self.core.inference.sample_with_retry(prompt, params, lora, req.num_samples)
            except (FanOutError, InferenceError) as exc:
                raise inference_error(exc) from exc
            return Result(PROTO, encode_sample_response(samples, want_prompt_logprobs=want_prompt,
                                                        topk_prompt=req.topk_prompt_logprobs,
                                                        topk_sample=req.topk_sample_logprobs))

        rid = await self.core.futures.submit(user, "Sample", None, work)
        return S.UntypedFuture(request_id=rid, sample_sequence_ids=ids)
