"""Issue 16: a new adapter version is staged (checked, then loaded off the engine's step loop) before
any server flips to it, all or nothing across servers; a bad adapter is refused at staging, naming
what is wrong, and leaves nothing behind: no flip, no staged copy, the old version still serving."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from skyrl_lora.inference.actor import start_server_actor
from skyrl_lora.inference.client import FanOutError, InferenceError, RemoteInferenceClient
from skyrl_lora.inference.server import ServerConfig

from .conftest import server_gpus, wait_for

pytestmark = pytest.mark.vllm

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def _variant(src: Path, out: Path, *, config: dict | None = None, tensors=None, truncate: bool = False) -> str:
    """A copy of the adapter at ``src`` with its config or tensors changed."""
    shutil.copytree(src, out)
    if config is not None:
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg.update(config)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    weights = out / "adapter_model.safetensors"
    if tensors is not None:
        ts = load_file(str(weights))
        tensors(ts)
        save_file(ts, str(weights))
    if truncate:
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    return str(out)


def _first(ts: dict, side: str) -> str:
    return next(k for k in sorted(ts) if ".q_proj.lora_" + side in k)


def _bad_adapters(meow: Path, root: Path) -> dict[str, tuple[str, str]]:
    """kind -> (path, a word the refusal must contain)."""

    def nan(ts: dict) -> None:
        ts[_first(ts, "B")][0, 0] = math.nan

    def inf(ts: dict) -> None:
        ts[_first(ts, "A")][1, 2] = math.inf

    def wide(ts: dict) -> None:
        k = _first(ts, "B")
        ts[k] = torch.zeros(ts[k].shape[0] + 1, ts[k].shape[1])

    def ints(ts: dict) -> None:
        k = _first(ts, "A")
        ts[k] = ts[k].to(torch.int32)

    return {
        "rank above max": (_variant(meow, root / "rank", config={"r": 4096}), "max_lora_rank"),
        "rank not its tensors'": (_variant(meow, root / "rank4", config={"r": 4}), "shape"),
        "shape": (_variant(meow, root / "shape", tensors=wide), "shape"),
        "dtype": (_variant(meow, root / "dtype", tensors=ints), "dtype"),
        "target modules": (_variant(meow, root / "targets", config={"target_modules": ["q_proj", "embed_tokens"]}),
                           "target_modules"),
        "NaN": (_variant(meow, root / "nan", tensors=nan), "NaN"),
        "Inf": (_variant(meow, root / "inf", tensors=inf), "Inf"),
        "truncated": (_variant(meow, root / "truncated", truncate=True), "damaged"),
    }


async def _tenant(client: RemoteInferenceClient, name: str):
    return [next(lo for lo in s.loras if lo.name == name) for s in await client.state()]


@pytest.mark.gpu
async def _refused(client: RemoteInferenceClient, name: str, path: str, word: str, kind: str):
    """Syncs ``name`` to ``path``, which must be refused (400 naming lora_path and ``word``) leaving
    nothing staged; returns the tenant's adapter after it."""
    with pytest.raises(FanOutError) as info:
        await client.update_lora(name, path)
    (err,) = info.value.errors.values()
    assert isinstance(err, InferenceError) and err.status == 400, (kind, err)
    assert "lora_path" in str(err) and word in str(err), (kind, err)
    (state,) = await client.state()
    assert state.staged == 0 and state.staged_on_workers == 0, (kind, state)  # nothing staged is left
    (now,) = await _tenant(client, name)
    return now


async def test_bad_adapters_are_refused_at_staging_and_leave_nothing(vllm_server, tiny, tok, word_ids,
                                                                     tmp_path) -> None:
    client = RemoteInferenceClient(vllm_server.url)
    name = "stage-bad"
    prompt = tok("x = 1")["input_ids"]
    await client.load_lora_adapter(name, str(tiny.loras["meow"]), load_inplace=False)
    try:
        (before,) = await _tenant(client, name)
        # requests of the tenant are running while every bad sync is tried
        running = [asyncio.create_task(client.sample_with_retry(prompt, {"max_tokens": 200, **GREEDY}, name))
                   for _ in range(2)]
        for kind, (path, word) in _bad_adapters(Path(tiny.loras["meow"]), tmp_path).items():
            now = await _refused(client, name, path, word, kind)
            assert (now.version, now.path, now.paused_by) == (before.version, before.path, {}), (kind, now)
        for (s,) in await asyncio.gather(*running):  # never cut: one version span each, all meow
            assert s.token_ids == [word_ids["meow"]] * 200 and len({v.version for v in s.version_spans}) == 1
        # and a good sync still works
        await client.update_lora(name, str(tiny.loras["woof"]))
        (s,) = await client.sample(prompt, {"max_tokens": 4, **GREEDY}, name)
        assert s.token_ids == [word_ids["woof"]] * 4
    finally:
        await client.unload_lora_adapter(name)


@pytest.fixture(scope="module")
def guarded_server(tiny, vllm_server, tmp_path_factory):
    """A second server that loads adapters only from its own root: a sync from elsewhere fails there."""
    root = tmp_path_factory.mktemp("guarded-root")
    meow = root / "meow"
    shutil.copytree(tiny.loras["meow"], meow)
    config = ServerConfig(model=str(tiny.base), max_loras=4, max_lora_rank=16, adapter_roots=(str(root),),
                          gpu_memory_utilization=0.3)
    actor, url = start_server_actor(config, num_cpus=1, num_gpus=server_gpus())
    yield url, meow
    try:
        ray.get(actor.shutdown.remote(), timeout=60)
    finally:
        ray.kill(actor)


async def test_a_version_is_published_on_every_server_or_on_none(vllm_server, guarded_server, tiny, tok,
                                                                 word_ids) -> None:
    url, inside = guarded_server
    client = RemoteInferenceClient([vllm_server.url, url])
    name = "stage-aon"
    prompt = tok("x = 1")["input_ids"]
    await client.load_lora_adapter(name, str(inside), load_inplace=False)
    try:
        before = await _tenant(client, name)
        with pytest.raises(FanOutError) as info:  # woof lies outside the second server's root
            await client.update_lora(name, str(tiny.loras["woof"]))
        assert set(info.value.errors) == {url} and info.value.errors[url].status == 403
        after = await _tenant(client, name)
        assert [(a.version, a.path) for a in after] == [(b.version, b.path) for b in before]  # nobody flipped
        for state in await client.state():
            assert state.staged == 0 and state.staged_on_workers == 0  # the first server dropped its stage
        for server in (vllm_server.url, url):
            (s,) = await client.sample(prompt, {"max_tokens": 4, **GREEDY}, name, url=server)
            assert s.token_ids == [word_ids["meow"]] * 4
        # a version both can read flips both
        woof_inside = inside.parent / "woof"
        shutil.copytree(tiny.loras["woof"], woof_inside, dirs_exist_ok=True)
        replies = await client.update_lora(name, str(woof_inside))
        assert [r.lora.version for r in replies] == [b.version + 1 for b in before]
        for server in (vllm_server.url, url):
            (s,) = await client.sample(prompt, {"max_tokens": 4, **GREEDY}, name, url=server)
            assert s.token_ids == [word_ids["woof"]] * 4
    finally:
        await client.unload_lora_adapter(name)


@pytest.mark.gpu
async def test_a_staged_version_serves_nobody_until_committed(vllm_server, tiny, tok, word_ids) -> None:
    """Staging alone changes nothing; a stage that is never committed is discarded and freed."""
    client = RemoteInferenceClient(vllm_server.url)
    name = "stage-two-phase"
    prompt = tok("x = 1")["input_ids"]
    await client.load_lora_adapter(name, str(tiny.loras["meow"]), load_inplace=False)
    try:
        staged = await client._post(vllm_server.url, "/skyrl/v1/stage_lora",
                                    {"lora_name": name, "lora_path": str(tiny.loras["woof"])})
        (state,) = await client.state()
        assert state.staged == 1 and state.staged_on_workers == 1
        (s,) = await client.sample(prompt, {"max_tokens": 4, **GREEDY}, name)
        assert s.token_ids == [word_ids["meow"]] * 4  # still the old version
        ref = {"stage_id": staged["stage_id"]}
        assert (await client._post(vllm_server.url, "/skyrl/v1/discard_lora", ref))["discarded"] is True
        (state,) = await client.state()
        assert state.staged == 0 and state.staged_on_workers == 0
        with pytest.raises(InferenceError) as err:  # a discarded stage cannot be committed
            await client._post(vllm_server.url, "/skyrl/v1/commit_lora", ref)
        assert err.value.status == 404 and "stage_id" in str(err.value)
    finally:
        await client.unload_lora_adapter(name)


@pytest.mark.gpu
async def test_staging_reaches_the_workers_without_the_engines_loop(vllm_server, tiny, tok, word_ids) -> None:
    """Every ``collective_rpc`` is a call vLLM's engine core answers between two steps, on the loop all
    tenants' tokens come from. Staging commands go to the workers over the stage channel and the
    workers' notices say when a version is ready: the engine's loop is asked only when a notice is
    late (at most once per backstop period), and the version still serves right after its flip."""
    from skyrl_lora.inference.lora_control import STAGE_BACKSTOP_S

    client = RemoteInferenceClient(vllm_server.url)
    name = "stage-channel"
    prompt = tok("x = 1")["input_ids"]
    await client.load_lora_adapter(name, str(tiny.loras["meow"]), load_inplace=False)
    try:
        (before,) = await client.state()
        assert before.stage_notices is not None, "this server has no stage channel"
        staging_s = []
        for i in range(6):
            word = ("woof", "meow")[i % 2]
            replies = await client.update_lora(name, str(tiny.loras[word]), mode=("abort", "inplace")[i % 2])
            staging_s += [r.staging_s for r in replies]
            (s,) = await client.sample(prompt, {"max_tokens": 2, **GREEDY}, name)
            assert s.token_ids == [word_ids[word]] * 2
        (after,) = await client.state()
        assert after.stage_commands - before.stage_commands == 6, (before, after)
        assert after.stage_notices is not None and after.stage_notices - before.stage_notices == 6, (before, after)
        # a status ask only per backstop period a staging took (generous: staging_s also counts the
        # checks made before the command is sent); before the channel it was one every 5 ms
        allowed = sum(math.floor(t / STAGE_BACKSTOP_S) for t in staging_s)
        assert after.stage_asks - before.stage_asks <= allowed, (before.stage_asks, after.stage_asks, staging_s)
    finally:
        await client.unload_lora_adapter(name)


@pytest.mark.gpu
async def test_an_inplace_version_is_armed_and_flips_before_the_next_step(vllm_server, tiny, tok, word_ids) -> None:
    """Issue 17: an in-place sync on a one-worker server is armed on the worker once staged, and the
    engine's own thread flips it in before its next step (no add_lora round trip after the reply). A
    request sent after the reply is wholly on the new version; a request in flight switches words
    exactly at the token the worker names as the new version's first; nothing stays staged; with
    armed flips off the same sync goes through the engine's add_lora and is logged by no worker."""
    client = RemoteInferenceClient(vllm_server.url)
    actor = vllm_server.actor
    name = "armed"
    prompt = tok("x = 1")["input_ids"]
    meow, woof = word_ids["meow"], word_ids["woof"]

    async def generating() -> bool:
        (st,) = await client.state()
        return any(info.name == name and info.in_flight_tokens >= 8 for info in st.loras)

    await client.load_lora_adapter(name, str(tiny.loras["meow"]), load_inplace=False)
    try:
        logged = len(await actor.flip_log.remote())
        (resp,) = await client.update_lora(name, str(tiny.loras["woof"]), mode="inplace")
        (s,) = await client.sample(prompt, {"max_tokens": 3, **GREEDY}, name)
        assert s.token_ids == [woof] * 3
        log = await actor.flip_log.remote()
        assert len(log) == logged + 1 and log[-1]["applied_at"] >= log[-1]["armed_at"] >= log[-1]["received_at"]
        # the sync's timeline: the server told the worker after its checks and heard back after the
        # worker armed it (one clock for the host's processes)
        t = resp.timeline
        assert t is not None and t.received is not None and t.checked is not None and t.staged is not None, t
        assert t.received <= t.checked <= log[-1]["received_at"] <= log[-1]["armed_at"] <= t.staged <= t.flipped, (t, log[-1])
        # applied before the new request's prefill: its first token is the new version's
        assert list(log[-1]["made_positions"].values()) == [len(prompt)]

        task = asyncio.create_task(client.sample(prompt, {"max_tokens": 160, **GREEDY}, name))
        await wait_for(generating, what="a request generating")
        (resp,) = await client.update_lora(name, str(tiny.loras["meow"]), mode="inplace")
        (s,) = await asyncio.wait_for(task, 120)
        k = s.token_ids.index(meow)
        assert k >= 8 and s.token_ids == [woof] * k + [meow] * (160 - k)
        log = await actor.flip_log.remote()
        assert len(log) == logged + 2 and list(log[-1]["made_positions"].values()) == [len(prompt) + k], log[-1]
        (state,) = await client.state()
        assert state.staged == 0 and state.staged_on_workers == 0

        await actor.set_armed_flips.remote(False)
        try:
            (resp,) = await client.update_lora(name, str(tiny.loras["woof"]), mode="inplace")
            (s,) = await client.sample(prompt, {"max_tokens": 3, **GREEDY}, name)
            assert s.token_ids == [woof] * 3 and resp.lora.version == 4
            assert len(await actor.flip_log.remote()) == logged + 2
        finally:
            await actor.set_armed_flips.remote(True)
    finally:
        await client.unload_lora_adapter(name)


@pytest.mark.gpu
async def test_an_armed_version_evicted_from_the_gpu_comes_back_as_itself(vllm_server, tiny, tok, word_ids) -> None:
    """An armed version's layer views (what vLLM re-activates an evicted adapter from) are made only
    when something first reads them: after as many other tenants as the server has GPU slots (8)
    have sampled, the tenant's next request re-activates it from vLLM's CPU cache, and it still
    says the new version's word."""
    client = RemoteInferenceClient(vllm_server.url)
    name, others = "armed-evicted", [f"armed-evictor-{i}" for i in range(8)]
    prompt = tok("x = 1")["input_ids"]
    meow, woof = word_ids["meow"], word_ids["woof"]
    for tenant in (name, *others):
        await client.load_lora_adapter(tenant, str(tiny.loras["meow"]), load_inplace=False)
    try:
        logged = len(await vllm_server.actor.flip_log.remote())
        await client.update_lora(name, str(tiny.loras["woof"]), mode="inplace")
        (s,) = await client.sample(prompt, {"max_tokens": 3, **GREEDY}, name)
        assert s.token_ids == [woof] * 3
        log = await vllm_server.actor.flip_log.remote()
        assert len(log) == logged + 1 and log[-1]["error"] is None  # it was armed, not add_lora'd
        for other in others:  # least recently used of nine: out of the eight GPU slots
            (s,) = await client.sample(prompt, {"max_tokens": 3, **GREEDY}, other)
            assert s.token_ids == [meow] * 3
        (s,) = await client.sample(prompt, {"max_tokens": 3, **GREEDY}, name)
        assert s.token_ids == [woof] * 3
    finally:
        for tenant in (name, *others):
            await client.unload_lora_adapter(tenant)


async def test_trainer_publishes_through_shared_memory_and_keeps_a_durable_copy(vllm_server, tiny, tmp_path,
                                                                               word_ids, tok) -> None:
    """save_weights_for_sampler writes the version to shared memory, the server stages it from there,
    the durable copy (what a tinker:// path names and a restarted server reloads) is written after
    the call returns (``durable`` waits for it), and the shared-memory copy is freed once the servers
    have it and the durable copy is written."""
    import uuid

    from skyrl_lora.training.actor import start_trainer_actor
    from skyrl_lora.training.config import TrainerConfig
    from skyrl_lora.training.protocol import LoraSpec

    shm = Path("/dev/shm") / "skyrl_lora" / f"test-{uuid.uuid4().hex[:8]}"
    trainer = start_trainer_actor(TrainerConfig(
        base_model=str(tiny.base), state_dir=tmp_path / "state", sampler_root=tmp_path / "adapters", publish_root=shm,
        inference_urls=(vllm_server.url,), max_lora_rank=16, num_threads=1), num_gpus=0)
    client = RemoteInferenceClient(vllm_server.url)
    try:
        await trainer.create_lora.remote("shm-tenant", LoraSpec(rank=4))
        saved = await trainer.save_weights_for_sampler.remote("shm-tenant", "v1")
        assert saved.synced and Path(saved.path).is_relative_to(tmp_path / "adapters"), saved
        await trainer.durable.remote(saved.path)
        assert (Path(saved.path) / "adapter_model.safetensors").is_file()

        async def shm_freed() -> bool:
            return not any(p.is_file() for p in shm.rglob("*"))
        await wait_for(shm_freed, timeout_s=30, what="the shared-memory export to be removed")
        (lora,) = await _tenant(client, "shm-tenant")
        assert lora.path == str(Path(saved.path).resolve()) and lora.version == 1
        (s,) = await client.sample(tok("x = 1")["input_ids"], {"max_tokens": 4, **GREEDY}, "shm-tenant")
        assert len(s.token_ids) == 4
        before = ray.get(vllm_server.actor.stage_timings.remote(), timeout=60)
        await trainer.profile_exports.remote(str(tmp_path / "profiles"), 1)  # this export only (benchmarks)
        saved2 = await trainer.save_weights_for_sampler.remote("shm-tenant", "v2")
        await trainer.durable.remote(saved2.path)
        profiled = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "profiles").iterdir())
        assert profiled == ["trace.json", "txt"], profiled
        (lora,) = await _tenant(client, "shm-tenant")
        assert lora.version == 2 and lora.path == str(Path(saved2.path).resolve())
        # the publication lined up end to end, trainer and server on the host's one clock
        t = saved2.timeline
        assert t is not None and t.server is not None and None not in (t.server.received, t.server.checked), t
        assert t.called <= t.exported <= t.server.received <= t.server.checked <= t.server.flipped <= t.synced, t
        # the export's parts (a slot image written to shared memory), in order within it
        assert list(t.export_parts) == ["began", "cast", "configured", "renamed"], t.export_parts
        assert t.called <= min(t.export_parts.values()) and max(t.export_parts.values()) <= t.exported, t
        assert list(t.export_parts.values()) == sorted(t.export_parts.values()), t.export_parts
        # published as the server's ready slot image (nothing built or loaded there) ...
        after = ray.get(vllm_server.actor.stage_timings.remote(), timeout=60)
        assert {k: len(after[k]) - len(before.get(k, [])) for k in ("prebuilt_ms", "load_ms", "build_ms")} == \
            {"prebuilt_ms": 1, "load_ms": 0, "build_ms": 0}, after
        # ... whose slot holds bit for bit what vLLM's own load of the durable copy writes
        await client.load_lora_adapter("shm-legacy", str(tiny.loras["woof"]), load_inplace=False)
        await client.update_lora("shm-legacy", saved2.path, off_loop=False)
        digests = {n: ray.get(vllm_server.actor.slot_digest.remote(n), timeout=60) for n in ("shm-tenant", "shm-legacy")}
        assert None not in digests["shm-tenant"] and digests["shm-tenant"] == digests["shm-legacy"], digests
    finally:
        ray.kill(trainer)
        await client.unload_lora_adapter("shm-tenant")
        with contextlib.suppress(FanOutError):
            await client.unload_lora_adapter("shm-legacy")
        shutil.rmtree(shm, ignore_errors=True)


async def test_bad_slot_images_are_refused_and_a_good_one_serves(vllm_server, tiny, tok, word_ids, tmp_path) -> None:
    """A version published as a ready slot image (slot_image) with NaN weights, laid out for another
    layout, or cut short is refused (400 naming lora_path) and the old version keeps serving; a good
    one serves its weights."""
    from skyrl_lora.inference.slot_image import IMAGE_FILE, write_image

    client = RemoteInferenceClient(vllm_server.url)
    (layout,) = await client.slot_plans()
    assert layout.plan is not None and layout.digest is not None
    woof = Path(tiny.loras["woof"])
    weights = load_file(str(woof / "adapter_model.safetensors"))
    cfg = json.loads((woof / "adapter_config.json").read_text())

    def image_dir(name: str, plan, tensors) -> str:
        out = tmp_path / name
        out.mkdir()
        shutil.copyfile(woof / "adapter_config.json", out / "adapter_config.json")
        write_image(out, plan, tensors, cfg["lora_alpha"] / cfg["r"])
        return str(out)

    first = sorted(weights)[0]
    nan = {**weights, first: weights[first].clone().index_fill_(1, torch.tensor([0]), float("nan"))}
    short = image_dir("short", layout.plan, weights)
    with open(Path(short) / IMAGE_FILE, "r+b") as f:
        f.truncate(1000)
    bad = {"nan": (image_dir("nan", layout.plan, nan), "NaN or Inf"),
           "layout": (image_dir("other", layout.plan.model_copy(update={"numel": layout.plan.numel + 8}), weights),
                      "another server layout"),
           "short": (short, "1000 bytes")}
    name, prompt = "image-bad", tok("x = 1")["input_ids"]
    await client.load_lora_adapter(name, str(tiny.loras["meow"]), load_inplace=False)
    try:
        (before,) = await _tenant(client, name)
        for kind, (path, word) in bad.items():
            now = await _refused(client, name, path, word, kind)
            assert (now.version, now.path) == (before.version, before.path), (kind, now)
            (s,) = await client.sample(prompt, {"max_tokens": 4, **GREEDY}, name)
            assert s.token_ids == [word_ids["meow"]] * 4, kind
        await client.update_lora(name, image_dir("good", layout.plan, weights))
        (s,) = await client.sample(prompt, {"max_tokens": 4, **GREEDY}, name)
        assert s.token_ids == [word_ids["woof"]] * 4
    finally:
        await client.unload_lora_adapter(name)


def _with_unembed(src: Path, base: Path, out: Path) -> str:
    """``src`` with a small random LoRA on lm_head added and its scaling changed a little (its greedy
    tokens stay ``src``'s)."""
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]

    def add(ts: dict) -> None:
        a = next(t for k, t in ts.items() if k.endswith("lora_A.weight"))
        gen = torch.Generator().manual_seed(5)
        ts["base_model.model.lm_head.lora_A.weight"] = (torch.randn(a.shape, generator=gen) * 0.02).to(a.dtype)
        ts["base_model.model.lm_head.lora_B.weight"] = (torch.randn(vocab, a.shape[0], generator=gen) * 0.02).to(a.dtype)

    cfg = json.loads((src / "adapter_config.json").read_text())
    # alpha 15 for r=8: a scaling (1.875) that is not a power of two, so B's rounding is compared too
    return _variant(src, out, config={"target_modules": [*cfg["target_modules"], "lm_head"], "lora_alpha": 15},
                    tensors=add)


@pytest.fixture(scope="module")
def builder_server(tiny, vllm_server):
    """A server whose slot images are built by builder processes (``slot_builders``)."""
    import types

    config = ServerConfig(model=str(tiny.base), max_loras=8, max_lora_rank=16, slot_builders=True,
                          gpu_memory_utilization=0.3)
    actor, url = start_server_actor(config, num_cpus=1, num_gpus=server_gpus())
    yield types.SimpleNamespace(actor=actor, url=url)
    try:
        ray.get(actor.shutdown.remote(), timeout=60)
    finally:
        ray.kill(actor)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["abort", "inplace"])
@pytest.mark.parametrize("built_by", ["threads", "builders"])
async def test_a_flip_from_a_slot_image_fills_the_slot_as_vllms_own_load(request, tiny, tok, word_ids,
                                                                          mode, built_by, tmp_path) -> None:
    """A staged version's slot image is made off the step loop (on a staging thread, or by a builder
    process) and copied in at the flip in one go; the slot it fills must hold bit for bit what vLLM's
    own per-module load writes for that adapter (padding to the maximum rank, q/k/v and gate/up
    split, scaling, the lm_head LoRA), and serve the same tokens."""
    vllm_server = request.getfixturevalue("vllm_server" if built_by == "threads" else "builder_server")
    client = RemoteInferenceClient(vllm_server.url)
    imaged, legacy = f"slot-image-{mode}", f"slot-legacy-{mode}"
    prompt = tok("x = 1")["input_ids"]
    new = _with_unembed(tiny.loras["meow"], tiny.base, tmp_path / "meow-unembed")
    await client.load_lora_adapter(imaged, str(tiny.loras["woof"]), load_inplace=False)
    await client.load_lora_adapter(legacy, str(tiny.loras["woof"]), load_inplace=False)
    try:
        before = ray.get(vllm_server.actor.stage_timings.remote(), timeout=60)
        await client.update_lora(imaged, new, mode=mode)  # staged: a slot image
        await client.update_lora(legacy, new, mode=mode, off_loop=False)  # vLLM's load
        after = ray.get(vllm_server.actor.stage_timings.remote(), timeout=60)
        made = {"threads": ("load_ms", "build_ms"), "builders": ("build_ms", "load_ms")}[built_by]
        # the staged one was made where asked (and only there) and flipped from its image
        for kind, more in (("flip_ms", 1), (made[0], 1), (made[1], 0)):
            assert len(after[kind]) == min(4096, len(before[kind]) + more), (kind, after)
        (state,) = await client.state()
        assert state.staged_on_workers == 0  # the image was consumed by its flip
        digests = {name: ray.get(vllm_server.actor.slot_digest.remote(name), timeout=60) for name in (imaged, legacy)}
        assert None not in digests[imaged] and digests[imaged] == digests[legacy], digests
        for name in (imaged, legacy):
            (s,) = await client.sample(prompt, {"max_tokens": 4, **GREEDY}, name)
            assert s.token_ids == [word_ids["meow"]] * 4
    finally:
        await client.unload_lora_adapter(imaged)
        await client.unload_lora_adapter(legacy)


@pytest.mark.gpu
async def test_a_version_sent_as_files_is_served_from_the_servers_own_memory(vllm_server, tiny, tok,
                                                                               word_ids) -> None:
    """For a server on another node: the files are PUT to it, staged by upload id, served from its
    upload store until replaced, then freed; bad uploads are refused naming what is wrong."""
    from .conftest import wait_for

    client = RemoteInferenceClient(vllm_server.url)
    url, name = vllm_server.url, "uploaded"
    prompt = tok("x = 1")["input_ids"]
    await client.upload_adapter(url, "uploaded-v2", tiny.loras["meow"])
    await client.load_lora_adapter(name, str(tiny.loras["woof"]), load_inplace=False)
    try:
        staged = await client._post(url, "/skyrl/v1/stage_lora", {"lora_name": name, "lora_path": "/trainer/only",
                                                                  "upload_id": "uploaded-v2"})
        committed = await client._post(url, "/skyrl/v1/commit_lora", {"stage_id": staged["stage_id"]})
        # a two-phase sync's timeline: checked and staged by the stage request, none received by the commit
        t = committed["timeline"]
        assert t["received"] is None and t["checked"] <= t["staged"] <= t["flipped"], t
        (info,) = await _tenant(client, name)
        assert "/uploads/" in info.path and info.version == 2
        (s,) = await client.sample(prompt, {"max_tokens": 4, **GREEDY}, name)
        assert s.token_ids == [word_ids["meow"]] * 4
        await client.update_lora(name, str(tiny.loras["woof"]))  # replaced: the upload is freed

        async def freed() -> bool:
            return not Path(info.path).exists()

        await wait_for(freed, 30, "the replaced upload freed")
        refusals = [
            (client._request("PUT", url, "/skyrl/v1/uploads/u1/model.bin", content=b"x"), 400, "filename"),
            (client._request("PUT", url, "/skyrl/v1/uploads/..%2Fx/adapter_config.json", content=b"x"), None, None),
            (client._post(url, "/skyrl/v1/stage_lora", {"lora_name": name, "lora_path": "/x", "upload_id": "nope"}),
             400, "upload_id"),
            (client._post(url, "/skyrl/v1/stage_lora", {"lora_name": name, "lora_path": "/x", "upload_id": "nope",
                                                        "load_from": "/y"}), None, None),
        ]
        for call, status, field in refusals:
            with pytest.raises(InferenceError) as err:
                await call
            assert 400 <= err.value.status < 500 and status in (None, err.value.status), err.value
            assert field is None or err.value.field == field, err.value
        (state,) = await client.state()
        assert state.staged == 0 and state.node
    finally:
        await client.unload_lora_adapter(name)
