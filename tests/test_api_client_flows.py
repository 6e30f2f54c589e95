"""What a real Tinker client does beyond the training loop (issue 19), through the unmodified ``tinker``
SDK and tinker-cookbook's own library code, against the real service, trainer actor and vLLM server:
retried requests applied once, weights taken out with ``weights.download``, checkpoints that expire,
and prompt logprobs from many requests at once."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import httpx
import pytest

from skyrl_lora.api.server import ApiServer, build_app

from .conftest import ALICE, BOB
from .test_api import woof_datum

pytestmark = [pytest.mark.vllm]
TTL_S = 15


class FailFirstResponse:
    """ASGI wrapper: the first request to ``path`` is served, then its answer is replaced by a 503, as a
    proxy or a lost connection would; the client never learns that its request was applied."""

    def __init__(self, app, path: str) -> None:
        self.app = app
        self.path = path
        self.failed: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") != self.path or self.failed:
            await self.app(scope, receive, send)
            return
        key = dict(scope["headers"]).get(b"x-idempotency-key", b"").decode()
        self.failed.append(key)

        async def swallow(message) -> None:
            return None

        await self.app(scope, receive, swallow)
        body = b'{"error": "injected: the answer was lost", "field": null}'
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _serve(app) -> tuple[str, callable]:
    """``app`` on loopback with uvicorn on a thread; returns its URL and a stop function."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "test server did not start"
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(30)
    return f"http://127.0.0.1:{port}", stop


def _train(tc, datum, types) -> dict[str, float]:
    fb = tc.forward_backward([datum], "cross_entropy").result()
    opt = tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return {"loss": fb.metrics["loss:sum"], **opt.metrics}


def test_a_retried_request_is_applied_once(api_env, tok) -> None:
    import tinker
    from tinker import types

    settings = api_env["settings"].model_copy(update={"data_dir": api_env["settings"].data_dir.parent / "api-faults"})
    app, _ = build_app(settings, api_env["trainer"], [api_env["vllm"].url])
    wrapped = FailFirstResponse(app, "/api/v1/forward_backward")
    url, stop = _serve(wrapped)
    try:
        name = settings.served_name
        _, datum = woof_datum(tok, types)
        # the twin: same seed, same data, no fault
        twin = tinker.ServiceClient(base_url=url, api_key=ALICE).create_lora_training_client(
            base_model=name, rank=4, seed=7).result()
        faulty = tinker.ServiceClient(base_url=url, api_key=ALICE).create_lora_training_client(
            base_model=name, rank=4, seed=7).result()
        # The faulty client's first forward_backward is applied, its answer lost (503); the SDK sends it
        # again with the same X-Idempotency-Key and must get the same future, not a second application.
        got = _train(faulty, datum, types)
        assert len(wrapped.failed) == 1 and wrapped.failed[0].startswith("stainless-python-retry-")
        wrapped.failed.append("done")  # later requests pass
        want = _train(twin, datum, types)
        # one application: the same gradient (a doubled one shows in grad_norm) and bitwise the same weights
        assert got == want, (got, want)
        probe = twin.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
        assert faulty.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist() == probe

        # the same key with another body: 409 naming the header; the same body again: the same future
        body = {"model_id": twin.model_id, "adam_params": {"learning_rate": 0.0}}
        with httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": ALICE, "X-Idempotency-Key": "k-1"}) as http:
            first = http.post("/api/v1/optim_step", json=body)
            assert first.status_code == 200
            other = http.post("/api/v1/optim_step", json={**body, "adam_params": {"learning_rate": 1.0}})
            assert other.status_code == 409 and other.json()["error"]["field"] == "X-Idempotency-Key"
            again = http.post("/api/v1/optim_step", json=body)
            assert again.json()["request_id"] == first.json()["request_id"]
            # keys are per user: Bob's k-1 is his own
            assert http.post("/api/v1/create_session", json={}, headers={"X-API-Key": BOB}).status_code == 200
    finally:
        stop()

    # ... and the key outlives a restart of the service
    restarted = ApiServer(settings, api_env["trainer"], [api_env["vllm"].url]).start()
    try:
        with httpx.Client(base_url=restarted.url, timeout=60,
                          headers={"X-API-Key": ALICE, "X-Idempotency-Key": "k-1"}) as http:
            assert http.post("/api/v1/optim_step", json=body).json()["request_id"] == first.json()["request_id"]
    finally:
        restarted.stop()


def test_weights_download_gives_the_adapter_the_service_serves(api_env, tok, tmp_path, monkeypatch) -> None:
    """tinker-cookbook's ``weights.download`` of a training checkpoint (create from state, age-encrypted
    save_weights_external, signed URLs, decryption, delete); the files load with peft and vLLM and
    give what the service's sampler gives."""
    import tinker
    import torch
    from peft import PeftModel
    from tinker import types
    from tinker_cookbook import weights
    from transformers import AutoModelForCausalLM

    from skyrl_lora.inference.client import RemoteInferenceClient

    url, name = api_env["server"].url, api_env["settings"].served_name
    monkeypatch.setenv("TINKER_API_KEY", ALICE)
    sc = tinker.ServiceClient(base_url=url, api_key=ALICE)
    tc = sc.create_lora_training_client(base_model=name, rank=8, seed=3).result()
    prompt, datum = woof_datum(tok, types)
    for _ in range(4):
        tc.forward_backward([datum], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-3))
    state = tc.save_state("for-download").result().path
    smp = tc.save_weights_and_get_sampling_client().result()

    out = tmp_path / "adapter"
    weights.download(tinker_path=state, output_dir=str(out), base_url=url)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # the temporary export was deleted by the cookbook; nothing external is left in the listing
    rest = tinker.RestClient(base_url=url, api_key=ALICE)
    assert all(c.checkpoint_type != "external" for c in rest.list_user_checkpoints().result().checkpoints)

    params = types.SamplingParams(max_tokens=8, temperature=0.0)
    served = smp.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0].tokens
    served_lp = smp.compute_logprobs(types.ModelInput.from_ints(prompt + served)).result()

    base = AutoModelForCausalLM.from_pretrained(api_env["settings"].base_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.eos_token_id or 0)[0, len(prompt):].tolist()
    assert ids == served

    import asyncio

    async def in_vllm() -> tuple[list[int], list[float | None]]:
        client = RemoteInferenceClient(api_env["vllm"].url)
        try:
            await client.load_lora_adapter("downloaded", str(out), load_inplace=False)
            (s,) = await client.sample(prompt, {"max_tokens": 8, "temperature": 0.0}, "downloaded")
            (lp,) = await client.sample(prompt + served, {"max_tokens": 1, "prompt_logprobs": 0}, "downloaded")
            await client.unload_lora_adapter("downloaded")
            return s.token_ids, lp.prompt_logprobs
        finally:
            await client.aclose()

    tokens, logprobs = asyncio.run(in_vllm())
    assert tokens == served
    assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(logprobs[1:], served_lp[1:])), (logprobs, served_lp)


def test_external_weights_urls_are_signed_and_owned(api_env) -> None:
    import tinker

    url, name = api_env["server"].url, api_env["settings"].served_name
    sc = tinker.ServiceClient(base_url=url, api_key=ALICE)
    tc = sc.create_lora_training_client(base_model=name, rank=4).result()
    export = tc.save_weights_external("plain").result().path
    assert export == f"tinker://{tc.model_id}/external_weights/plain"
    rest = tinker.RestClient(base_url=url, api_key=ALICE)
    urls = rest.get_external_weights_urls(export).result().urls
    assert sorted(urls) == ["adapter_config.json", "adapter_model.safetensors"]
    with httpx.Client(timeout=60) as http:  # no API key: the URL is the authority
        good = http.get(urls["adapter_config.json"])
        assert good.status_code == 200 and b'"r": 4' in good.content
        tampered = urls["adapter_config.json"].replace("signature=", "signature=0")
        assert http.get(tampered).status_code == 403
        other_file = urls["adapter_config.json"].replace("adapter_config.json", "adapter_model.safetensors", 1)
        assert http.get(other_file).status_code == 403  # a signature covers one file
    bob = tinker.RestClient(base_url=url, api_key=BOB)
    with pytest.raises(tinker.NotFoundError):
        bob.get_external_weights_urls(export).result()
    with httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": ALICE}) as http:
        bad = http.post("/api/v1/save_weights_external", json={
            "model_id": tc.model_id, "path": "x", "age_encryption_recipients": ["age1nope"]})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "age_encryption_recipients.0"
        sampler = http.get(f"/api/v1/training_runs/{tc.model_id}/checkpoints/weights/x/external_weights_urls")
        assert sampler.status_code == 400 and sampler.json()["error"]["field"] == "checkpoint_id"
    rest.delete_checkpoint_from_tinker_path(export).result()
    with httpx.Client(timeout=60) as http:
        assert http.get(urls["adapter_config.json"]).status_code == 404  # deleted: the files are gone


def test_checkpoints_with_a_ttl_expire_from_listing_and_disk(api_env) -> None:
    import tinker

    url, name = api_env["server"].url, api_env["settings"].served_name
    root = Path(api_env["settings"].data_dir).parent
    sc = tinker.ServiceClient(base_url=url, api_key=ALICE)
    tc = sc.create_lora_training_client(base_model=name, rank=4).result()
    rest = tinker.RestClient(base_url=url, api_key=ALICE)
    exports = Path(api_env["settings"].data_dir) / "external_weights"
    exports_before = set(exports.iterdir()) if exports.exists() else set()
    kept = tc.save_state("kept").result().path
    # long enough that all three are still listed after the saves on a slow machine
    tc.save_state("short", ttl_seconds=TTL_S).result()
    tc.save_weights_for_sampler("short-sampler", ttl_seconds=TTL_S).result()
    tc.save_weights_external("short-export", ttl_seconds=TTL_S).result()
    tc.save_weights_for_sampler("newest").result()  # the served version (never removed while served)
    listed = {c.checkpoint_id: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert {"weights/short", "sampler_weights/short-sampler", "external_weights/short-export"} <= set(listed)
    assert listed["weights/short"].expires_at is not None and listed["weights/kept"].expires_at is None

    def on_disk() -> list[Path]:
        mine = [p for p in root.rglob("*") if p.name.startswith(("short.", "short-sampler-"))]
        return mine + [p for p in exports.iterdir() if p not in exports_before and not p.name.startswith(".")]

    assert len(on_disk()) == 3
    deadline = time.monotonic() + TTL_S + 60
    while on_disk() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not on_disk(), on_disk()
    names = {c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert names == {"weights/kept", "sampler_weights/newest"}
    # a TTL can be set on an existing checkpoint, and taken off again
    rest.set_checkpoint_ttl_from_tinker_path(kept, 3600).result()
    (c,) = [c for c in rest.list_checkpoints(tc.model_id).result().checkpoints if c.tinker_path == kept]
    assert c.expires_at is not None
    rest.set_checkpoint_ttl_from_tinker_path(kept, None).result()
    (c,) = [c for c in rest.list_checkpoints(tc.model_id).result().checkpoints if c.tinker_path == kept]
    assert c.expires_at is None
    with httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": ALICE}) as http:
        bad = http.post("/api/v1/save_weights", json={"model_id": tc.model_id, "path": "x", "ttl_seconds": 0})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "ttl_seconds"


def test_many_prompt_logprob_requests_through_the_sdk(api_env, tok, record_property) -> None:
    """16 concurrent compute_logprobs from two tenants and the base model, and one sample with four
    samples and prompt logprobs, all equal to the trainer's forward logprobs of the same tokens."""
    import tinker
    from tinker import types

    url, name = api_env["server"].url, api_env["settings"].served_name
    sc = tinker.ServiceClient(base_url=url, api_key=ALICE)
    _, datum = woof_datum(tok, types)
    tuned = sc.create_lora_training_client(base_model=name, rank=8, seed=1).result()
    for _ in range(3):
        tuned.forward_backward([datum], "cross_entropy")
        tuned.optim_step(types.AdamParams(learning_rate=5e-3))
    fresh = sc.create_lora_training_client(base_model=name, rank=8, seed=2).result()  # lora_B = 0: the base model
    fresh.forward_backward([datum], "cross_entropy")
    fresh.optim_step(types.AdamParams(learning_rate=5e-3))
    samplers = {"tuned": tuned.save_weights_and_get_sampling_client().result(),
                "fresh": fresh.save_weights_and_get_sampling_client().result(),
                "base": sc.create_sampling_client(base_model=name).result()}
    trainers = {"tuned": tuned, "fresh": fresh, "base": None}

    prompts = [tok(text)["input_ids"] for text in ("def main():\n    return", "x = [1, 2, 3]\nprint(x)")]
    base_tc = sc.create_lora_training_client(base_model=name, rank=4).result()  # never trained: exactly the base

    def reference(who: str, prompt: list[int]) -> list[float]:
        tc = trainers[who] or base_tc
        d = types.Datum(model_input=types.ModelInput.from_ints(prompt[:-1]),
                        loss_fn_inputs={"target_tokens": prompt[1:], "weights": [1.0] * (len(prompt) - 1)})
        return tc.forward([d], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()

    jobs = [(("tuned", "fresh", "base")[i % 3], prompts[i % 2]) for i in range(16)]
    futures = [samplers[who].compute_logprobs(types.ModelInput.from_ints(p)) for who, p in jobs]
    many = samplers["tuned"].sample(types.ModelInput.from_ints(prompts[0]), 4,
                                    types.SamplingParams(max_tokens=3, temperature=1.0, seed=5),
                                    include_prompt_logprobs=True)
    worst = 0.0
    for (who, prompt), fut in zip(jobs, futures):
        got = fut.result()
        want = reference(who, prompt)
        assert got[0] is None and len(got) == len(prompt)
        worst = max(worst, max(abs(a - b) for a, b in zip(got[1:], want)))
    res = many.result()
    assert len(res.sequences) == 4 and res.prompt_logprobs is not None
    want = reference("tuned", prompts[0])
    worst = max(worst, max(abs(a - b) for a, b in zip(res.prompt_logprobs[1:], want)))
    record_property("prompt_logprob_max_abs_diff_vs_trainer", worst)
    # vLLM (fp32 on CPU, bf16 on a GPU) against the trainer's HF forward of the same adapter
    assert worst < 0.05, worst
    again = samplers["base"].sample(types.ModelInput.from_ints(prompts[1]), 1,
                                    types.SamplingParams(max_tokens=4, temperature=0.0)).result()
    assert len(again.sequences[0].tokens) == 4  # the engine still serves


def test_only_the_newest_ephemeral_samplers_stay_loaded(api_env, tok) -> None:
    """With keep_ephemeral_samplers=1, a model's older pinned sampler is unloaded and answers 404 saying
    it expired, while the newest samples."""
    import tinker
    from tinker import types

    settings = api_env["settings"].model_copy(update={"data_dir": api_env["settings"].data_dir.parent / "api-keep1",
                                                      "keep_ephemeral_samplers": 1})
    app, _ = build_app(settings, api_env["trainer"], [api_env["vllm"].url])
    url, stop = _serve(app)
    try:
        tc = tinker.ServiceClient(base_url=url, api_key=ALICE).create_lora_training_client(
            base_model=settings.served_name, rank=4).result()
        first = tc.save_weights_and_get_sampling_client().result()
        second = tc.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints(tok("x = ")["input_ids"])
        params = types.SamplingParams(max_tokens=2, temperature=0.0)
        assert len(second.sample(prompt, 1, params).result().sequences[0].tokens) == 2
        with pytest.raises(tinker.NotFoundError, match="expired"):
            first.sample(prompt, 1, params).result()
    finally:
        stop()


def test_lora_config_flags_are_honoured_or_reported(api_env) -> None:
    """seed: the same seed gives the same initial adapter, another seed another; train_attn/train_mlp
    choose the projections, train_unembed (the SDK's default) adds a LoRA on lm_head."""

    import tinker
    from safetensors.torch import load

    url, name = api_env["server"].url, api_env["settings"].served_name
    sc = tinker.ServiceClient(base_url=url, api_key=ALICE)
    rest = tinker.RestClient(base_url=url, api_key=ALICE)

    def initial(i: int, **lora) -> tuple[dict, object]:
        tc = sc.create_lora_training_client(base_model=name, rank=4, **lora).result()
        export = tc.save_weights_external(f"init-{i}").result().path
        urls = rest.get_external_weights_urls(export).result().urls
        tensors = load(httpx.get(urls["adapter_model.safetensors"], timeout=60).content)
        info = rest.get_weights_info_by_tinker_path(tc.save_state(f"init-{i}").result().path).result()
        return tensors, info

    a, info_a = initial(1, seed=11)
    b, _ = initial(2, seed=11)
    c, _ = initial(3, seed=12)
    mlp_only, info_mlp = initial(4, seed=11, train_attn=False, train_unembed=False)
    lora_a = sorted(k for k in a if "lora_A" in k)
    assert lora_a and all(a[k].equal(b[k]) for k in a)  # same seed, same start (lora_B is zero)
    assert any(not a[k].equal(c[k]) for k in lora_a)  # another seed, another start
    assert mlp_only and all(any(m in k for m in ("gate_proj", "up_proj", "down_proj")) for k in mlp_only)
    assert {"base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"} <= set(a)
    assert info_a.train_attn and info_a.train_mlp and info_a.train_unembed
    assert not info_mlp.train_attn and info_mlp.train_mlp and not info_mlp.train_unembed and info_mlp.lora_rank == 4
    with httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": ALICE}) as http:
        session = http.post("/api/v1/create_session", json={}).json()["session_id"]
        neither = http.post("/api/v1/create_model", json={
            "session_id": session, "model_seq_id": 0, "base_model": name,
            "lora_config": {"rank": 4, "train_attn": False, "train_mlp": False, "train_unembed": False}})
        assert neither.status_code == 400 and neither.json()["error"]["field"] == "lora_config"
