"""Issue 4: per-LoRA pause/abort/sync against a real vLLM server in a Ray actor (tiny model, CPU)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading

import httpx
import pytest

from skyrl_lora.inference.client import FanOutError, InferenceError, RemoteInferenceClient
from skyrl_lora.inference.protocol import SampleOut

from .conftest import wait_for

# Runs on CPU in CI and, unchanged, as the GPU suite on the device (`pytest -m gpu`).
pytestmark = [pytest.mark.vllm, pytest.mark.gpu]

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def prompt(tok) -> list[int]:
    return tok("def main():\n    print('hello')")["input_ids"]


@pytest.fixture()
def client(vllm_server) -> RemoteInferenceClient:
    return RemoteInferenceClient(vllm_server.url)


async def lora_info(client: RemoteInferenceClient, name: str):
    (state,) = await client.state()
    return next(lo for lo in state.loras if lo.name == name)


def in_flight(client: RemoteInferenceClient, name: str, count: int, tokens: int = 0):
    async def check() -> bool:
        info = await lora_info(client, name)
        return info.in_flight >= count and info.in_flight_tokens >= tokens
    return check


async def test_pausing_one_lora_leaves_other_tenants_running(client, prompt, word_ids) -> None:
    """Test 1: while meow is paused, 4 woof samples complete with their full length."""
    await client.pause_generation("meow", lease_s=120)
    try:
        (state,) = await client.state()
        assert next(lo for lo in state.loras if lo.name == "meow").paused_by
        results = await asyncio.wait_for(
            asyncio.gather(*(client.sample_with_retry(prompt, {"max_tokens": 24, **GREEDY}, "woof") for _ in range(4))), 120)
        for (s,) in results:
            assert s.finish_reason == "length" and s.token_ids == [word_ids["woof"]] * 24
    finally:
        await client.resume_generation("meow")
    assert not (await lora_info(client, "meow")).paused_by


async def test_pause_aborts_only_that_loras_requests_and_resume_completes_them(client, prompt, word_ids) -> None:
    """Test 2: 4 meow + 4 woof in flight; pausing meow aborts exactly the 4 meow; all 8 finish whole."""
    meow = [asyncio.create_task(client.sample_with_retry(prompt, {"max_tokens": 160, **GREEDY}, "meow")) for _ in range(4)]
    woof = [asyncio.create_task(client.sample_with_retry(prompt, {"max_tokens": 48, **GREEDY}, "woof")) for _ in range(4)]
    await wait_for(in_flight(client, "meow", 4, tokens=4), what="4 meow requests generating")
    (reply,) = await client.pause_generation("meow", lease_s=120)
    assert reply["aborted"] == 4 and reply["drained"]
    try:
        done, _ = await asyncio.wait(woof, timeout=120)
        assert len(done) == 4, "woof samples must finish while meow is paused"
        assert not any(t.done() for t in meow), "no meow sample may complete before resume"
        info = await lora_info(client, "meow")
        assert info.in_flight == 0  # the retries wait at the gate, nothing of meow runs
    finally:
        await client.resume_generation("meow")
    meow_results = await asyncio.wait_for(asyncio.gather(*meow), 180)
    for (s,) in meow_results:
        assert s.finish_reason == "length"
        assert s.token_ids == [word_ids["meow"]] * 160 and len(s.logprobs) == 160
    for t in woof:
        (s,) = t.result()
        assert s.token_ids == [word_ids["woof"]] * 48


async def test_inplace_swap_mid_sample_stitches_one_completion(client, tiny, prompt, word_ids) -> None:
    """Test 3 + 5: pause, load woof into a meow-serving LoRA, resume -> one completion meow...woof;
    the continuation equals a fresh request on the new weights; other tenants keep their prefix cache."""
    name = "lora-target"
    await client.load_lora_adapter(name, str(tiny.loras["meow"]), load_inplace=False)
    try:
        long_prompt = prompt * 12  # well over one KV block, for the prefix-cache check
        (warm,) = await client.sample(long_prompt, {"max_tokens": 4, **GREEDY}, "woof")
        max_tokens = 200
        task = asyncio.create_task(client.sample_with_retry(prompt, {"max_tokens": max_tokens, **GREEDY}, name))
        await wait_for(in_flight(client, name, 1, tokens=8), what="lora-target generating")
        (paused,) = await client.pause_generation(name, lease_s=120)
        assert paused["aborted"] == 1
        (loaded,) = await client.load_lora_adapter(name, str(tiny.loras["woof"]), load_inplace=True)
        assert loaded.lora.version == 2
        await client.resume_generation(name)
        (s,) = await asyncio.wait_for(task, 180)
        assert s.finish_reason == "length" and len(s.token_ids) == max_tokens and len(s.logprobs) == max_tokens
        k = s.token_ids.index(word_ids["woof"])
        assert k >= 8
        assert s.token_ids == [word_ids["meow"]] * k + [word_ids["woof"]] * (max_tokens - k)
        assert [(v.version, v.start, v.end) for v in s.version_spans] == [(1, 0, k), (2, k, max_tokens)]
        # Test 5: no stale KV: the continuation equals a fresh request with the same prefix on the new weights.
        (fresh,) = await client.sample(prompt, {"max_tokens": max_tokens - k, **GREEDY}, name,
                                       prefix_output_token_ids=s.token_ids[:k])
        assert fresh.token_ids == s.token_ids[k:]
        assert fresh.logprobs == pytest.approx(s.logprobs[k:], abs=1e-3)
        # Another tenant's cached prefix survived the swap (no global prefix-cache reset) ...
        (again,) = await client.sample(long_prompt, {"max_tokens": 4, **GREEDY}, "woof")
        assert again.num_cached_tokens >= len(long_prompt) - 32 > 0, (warm.num_cached_tokens, again.num_cached_tokens)
        assert again.token_ids == warm.token_ids
    finally:
        await client.unload_lora_adapter(name)


async def test_engine_wide_pause_holds_every_request(client, prompt, word_ids) -> None:
    """Test 4: pause(None) is vLLM's engine-wide pause; held requests finish after resume, unaborted."""
    tasks = [asyncio.create_task(client.sample_with_retry(prompt, {"max_tokens": 96, **GREEDY}, lora))
             for lora in ("meow", "woof", "meow", "woof")]
    await wait_for(in_flight(client, "meow", 2, tokens=2), what="requests in flight")
    await client.pause_generation(None, lease_s=120)
    try:
        (state,) = await client.state()
        assert state.engine_paused_by
        before = await lora_info(client, "meow")
        # Two full state round trips later nothing has finished and no meow token was added.
        await client.state()
        after = await lora_info(client, "meow")
        assert not any(t.done() for t in tasks)
        assert after.in_flight_tokens == before.in_flight_tokens
    finally:
        await client.resume_generation(None)
    for t, lora in zip(tasks, ("meow", "woof", "meow", "woof")):
        (s,) = await asyncio.wait_for(t, 180)
        assert s.finish_reason == "length" and s.token_ids == [word_ids[lora]] * 96


async def test_random_pause_resume_cycles_are_seamless(client, prompt) -> None:
    """Test 6: 20 pause/resume cycles at random moments against 4 tenants: every result is
    token-identical to its uninterrupted twin, logprobs within tolerance."""
    tenants = ("meow", "woof", "meow2", "woof2")
    rng = random.Random(1234)
    prompts = {t: prompt[: 3 + i] for i, t in enumerate(tenants)}
    params = {"max_tokens": 40, **GREEDY}
    twins = {t: (await client.sample(prompts[t], params, t))[0] for t in tenants}
    stop = asyncio.Event()
    results: list[tuple[str, SampleOut]] = []

    async def sampler(t: str) -> None:
        while not stop.is_set():
            (s,) = await client.sample_with_retry(prompts[t], params, t)
            results.append((t, s))

    workers = [asyncio.create_task(sampler(t)) for t in tenants for _ in range(2)]
    aborted = 0
    for _ in range(20):
        t = rng.choice(tenants)
        await asyncio.sleep(rng.uniform(0.0, 0.3))  # a random moment, not a wait for an outcome
        (reply,) = await client.pause_generation(t, lease_s=30)
        aborted += reply["aborted"]
        await client.resume_generation(t)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*workers), 180)
    assert aborted > 0, "no cycle hit an in-flight request; the test proved nothing"
    assert len(results) >= 8
    for t, s in results:
        assert s.token_ids == twins[t].token_ids, t
        assert s.logprobs == pytest.approx(twins[t].logprobs, abs=1e-3)


async def test_client_survives_event_loops_and_processes_share_the_gate(vllm_server, prompt, word_ids) -> None:
    """Test 7: one client across several asyncio.run loops; a pause made by another process is seen here."""
    shared = RemoteInferenceClient(vllm_server.url)
    outputs: list[list[int]] = []

    def in_fresh_loops() -> None:
        for _ in range(3):
            (s,) = asyncio.run(shared.sample(prompt, {"max_tokens": 3, **GREEDY}, "woof"))
            outputs.append(s.token_ids)

    th = threading.Thread(target=in_fresh_loops)
    th.start()
    await asyncio.to_thread(th.join, 120)
    assert outputs == [[word_ids["woof"]] * 3] * 3

    def run_process(action: str) -> None:
        code = ("import asyncio, sys; from skyrl_lora.inference.client import RemoteInferenceClient as C; "
                f"c = C(sys.argv[1], owner='proc-A'); asyncio.run(c.{action}('woof2'))")
        subprocess.run([sys.executable, "-c", code, vllm_server.url], check=True, timeout=120)

    client = RemoteInferenceClient(vllm_server.url)
    await asyncio.to_thread(run_process, "pause_generation")
    info = await lora_info(client, "woof2")
    assert "proc-A" in info.paused_by
    waiting = asyncio.create_task(client.sample_with_retry(prompt, {"max_tokens": 4, **GREEDY}, "woof2"))
    # Our resume (different owner) must not lift proc-A's pause.
    await client.resume_generation("woof2")
    assert "proc-A" in (await lora_info(client, "woof2")).paused_by
    assert not waiting.done()
    await asyncio.to_thread(run_process, "resume_generation")
    (s,) = await asyncio.wait_for(waiting, 60)
    assert s.token_ids == [word_ids["woof"]] * 4


async def test_two_owners_and_lease_expiry(vllm_server, prompt, word_ids) -> None:
    """A pause held by two owners lifts when both resume; a lease that runs out lifts by itself."""
    a = RemoteInferenceClient(vllm_server.url, owner="owner-a")
    b = RemoteInferenceClient(vllm_server.url, owner="owner-b")
    await a.pause_generation("meow2", lease_s=120)
    await b.pause_generation("meow2", lease_s=120)
    await a.resume_generation("meow2")
    assert set((await lora_info(a, "meow2")).paused_by) == {"owner-b"}
    await b.resume_generation("meow2")
    assert not (await lora_info(a, "meow2")).paused_by
    # Lease expiry: the pauser "dies" (never resumes); the waiting request completes after the lease.
    await a.pause_generation("meow2", lease_s=1.5)
    waiting = asyncio.create_task(a.sample_with_retry(prompt, {"max_tokens": 4, **GREEDY}, "meow2"))
    (s,) = await asyncio.wait_for(waiting, 60)
    assert s.token_ids == [word_ids["meow"]] * 4
    assert not (await lora_info(a, "meow2")).paused_by


async def test_vllm_openai_routes_honour_the_gate(client, vllm_server) -> None:
    """No caller slips past a pause through vLLM's own /v1/completions or /v1/chat/completions."""
    await client.pause_generation("woof2", lease_s=120)
    try:
        async with httpx.AsyncClient(timeout=120) as http:
            req = asyncio.create_task(http.post(vllm_server.url + "/v1/completions",
                                                json={"model": "woof2", "prompt": "Hi", "max_tokens": 3, "temperature": 0}))
            chat = asyncio.create_task(http.post(vllm_server.url + "/v1/chat/completions",
                                                 json={"model": "woof2", "messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 3, "temperature": 0}))
            await wait_for(lambda: _waiting_requests(client, 2), what="completion and chat waiting at the gate")
            assert not req.done() and not chat.done()
            await client.resume_generation("woof2")
            r = await asyncio.wait_for(req, 60)
            c = await asyncio.wait_for(chat, 60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " woof" * 3
        assert c.status_code == 200 and c.json()["choices"][0]["message"]["content"] == " woof" * 3
    finally:
        await client.resume_generation("woof2")


async def test_tenants_are_listed_in_vllms_model_registry_for_their_lifetime(client, vllm_server, tiny) -> None:
    """A tenant's name enters vLLM's own model list when it is first loaded (vLLM's registry call),
    stays through new versions (which only the controller knows of), and leaves when it is unloaded;
    vLLM's routes then answer 404 for it."""
    name = "registry-tenant"

    async def listed(http: httpx.AsyncClient) -> bool:
        models = (await http.get(vllm_server.url + "/v1/models")).json()
        return name in {m["id"] for m in models["data"]}

    async def complete(http: httpx.AsyncClient) -> httpx.Response:
        return await http.post(vllm_server.url + "/v1/completions",
                               json={"model": name, "prompt": "Hi", "max_tokens": 3, "temperature": 0})

    async with httpx.AsyncClient(timeout=120) as http:
        assert not await listed(http)
        await client.load_lora_adapter(name, str(tiny.loras["woof"]), load_inplace=False)
        try:
            assert await listed(http)
            r = await complete(http)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == " woof" * 3
            await client.update_lora(name, str(tiny.loras["meow"]))  # a new version: same name, new weights
            assert await listed(http)
            r = await complete(http)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == " meow" * 3
        finally:
            await client.unload_lora_adapter(name)
        assert not await listed(http)
        assert (await complete(http)).status_code == 404


async def _waiting_requests(client: RemoteInferenceClient, count: int) -> bool:
    # The completion reached the server and waits at the closed gate; nothing of woof2 runs.
    info = await lora_info(client, "woof2")
    return info.waiting == count and info.in_flight == 0


async def test_abort_lora_requests_route(client, vllm_server, prompt) -> None:
    """abort_lora_requests aborts every child of an n>1 request of that LoRA and nothing else."""
    task = asyncio.create_task(client.sample(prompt, {"max_tokens": 300, **GREEDY}, "meow2", num_samples=3))
    other = asyncio.create_task(client.sample(prompt, {"max_tokens": 30, **GREEDY}, "woof2"))
    await wait_for(in_flight(client, "meow2", 3, tokens=3), what="3 children in flight")
    assert await client.abort_lora_requests("meow2") == 3
    samples = await asyncio.wait_for(task, 60)
    assert [s.finish_reason for s in samples] == ["abort"] * 3
    assert all(0 < len(s.token_ids) < 300 for s in samples)
    (o,) = await asyncio.wait_for(other, 60)
    assert o.finish_reason == "length" and len(o.token_ids) == 30
    async with httpx.AsyncClient() as http:
        r = await http.post(vllm_server.url + "/skyrl/v1/abort_lora_requests", json={"lora_name": "nobody"})
    assert r.status_code == 404 and "nobody" in r.json()["error"]["message"]


async def test_sync_modes_record_versions(client, tiny, prompt, word_ids) -> None:
    """update_lora in both modes: abort mode moves in-flight requests to the new version at a seam;
    inplace mode keeps them running and they pick up the new weights."""
    name = "sync-modes"
    await client.load_lora_adapter(name, str(tiny.loras["meow"]), load_inplace=False)
    try:
        for mode, new_word, path in (("abort", "woof", tiny.loras["woof"]), ("inplace", "meow", tiny.loras["meow"])):
            old_word = "meow" if new_word == "woof" else "woof"
            task = asyncio.create_task(client.sample_with_retry(prompt, {"max_tokens": 160, **GREEDY}, name))
            await wait_for(in_flight(client, name, 1, tokens=4), what=f"{mode}: request generating")
            (resp,) = await client.update_lora(name, str(path), mode=mode)
            assert resp.aborted == (1 if mode == "abort" else 0)
            (s,) = await asyncio.wait_for(task, 120)
            assert len(s.token_ids) == 160 and s.finish_reason == "length"
            k = s.token_ids.index(word_ids[new_word])
            assert s.token_ids[:k] == [word_ids[old_word]] * k and k > 0
            versions = [v.version for v in s.version_spans]
            assert versions == sorted(versions) and versions[-1] == resp.lora.version
    finally:
        await client.unload_lora_adapter(name)


async def test_bad_input_is_rejected_clearly(client, vllm_server, prompt, tiny) -> None:
    """Test 8: unknown LoRA, empty prompt, bad max_tokens, out-of-vocab ids, bad paths: 4xx naming the field."""
    with pytest.raises(InferenceError) as e:
        await client.sample(prompt, {"max_tokens": 4}, "no-such-lora")
    assert e.value.status == 404 and "no-such-lora" in e.value.message
    with pytest.raises(InferenceError) as e:
        await client.sample(prompt, {"max_tokens": 5000}, "meow")
    assert e.value.status == 400 and "max_tokens" in e.value.message
    with pytest.raises(InferenceError) as e:
        await client.sample([0, 10**6], {"max_tokens": 2}, "meow")
    assert e.value.status == 400 and "prompt_token_ids" in e.value.message
    async with httpx.AsyncClient(timeout=30) as http:
        for body, field in (({"prompt_token_ids": []}, "prompt_token_ids"),
                            ({"prompt_token_ids": [1], "sampling_params": {"max_tokens": 0}}, "max_tokens"),
                            ({"prompt_token_ids": [1], "sampling_params": {"max_tokens": -3}}, "max_tokens"),
                            ({"prompt_token_ids": "abc"}, "prompt_token_ids")):
            r = await http.post(vllm_server.url + "/skyrl/v1/generate", json=body)
            assert 400 <= r.status_code < 500 and field in r.text, (body, r.status_code, r.text)
        r = await http.post(vllm_server.url + "/skyrl/v1/generate", content=b"{not json")
        assert 400 <= r.status_code < 500
    # Resume without pause is harmless.
    (reply,) = await client.resume_generation("meow")
    assert reply["paused"] is False
    # Loading from a path that is not an adapter: clear error, nothing registered.
    with pytest.raises(FanOutError) as fe:
        await client.load_lora_adapter("broken", str(tiny.base), load_inplace=False)
    (err,) = fe.value.errors.values()
    assert isinstance(err, InferenceError) and err.status == 400 and "adapter_config.json" in err.message
    assert "broken" not in {lo.name for lo in (await client.state())[0].loras}


async def test_stop_string_across_the_seam(client, tiny, prompt, word_ids) -> None:
    """A stop string that starts before an abort and ends after it is honoured on the stitched sample."""
    name = "seam-stop"
    await client.load_lora_adapter(name, str(tiny.loras["meow"]), load_inplace=False)
    try:
        params = {"max_tokens": 200, "temperature": 0.0, "ignore_eos": True, "stop": ["meow woof"]}
        task = asyncio.create_task(client.sample_with_retry(prompt, params, name))
        await wait_for(in_flight(client, name, 1, tokens=4), what="seam-stop generating")
        (resp,) = await client.update_lora(name, str(tiny.loras["woof"]), mode="abort")
        assert resp.aborted == 1
        (s,) = await asyncio.wait_for(task, 120)
        k = s.token_ids.index(word_ids["woof"])
        assert s.token_ids == [word_ids["meow"]] * k + [word_ids["woof"]]
        assert s.finish_reason == "stop" and s.stop_reason == "meow woof"
        assert len(s.logprobs) == k + 1
    finally:
        await client.unload_lora_adapter(name)


async def test_more_tenants_than_adapter_slots_reload_on_demand(client, tiny, prompt, word_ids) -> None:
    """20 tenants on a server with 8 GPU slots and 16 CPU-cached adapters: every request is served
    (vLLM reloads evicted adapters from their latest path), never answered with a 404."""
    names = [f"many-{i}" for i in range(20)]
    words = ["meow" if i % 2 == 0 else "woof" for i in range(20)]
    for name, word in zip(names, words):
        await client.load_lora_adapter(name, str(tiny.loras[word]), load_inplace=False)
    try:
        for _ in range(2):  # the second pass finds the early tenants evicted from vLLM's caches
            results = await asyncio.wait_for(asyncio.gather(
                *(client.sample(prompt, {"max_tokens": 4, **GREEDY}, n) for n in names)), 180)
            for (s,), word in zip(results, words):
                assert s.token_ids == [word_ids[word]] * 4
    finally:
        for name in names:
            await client.unload_lora_adapter(name)
