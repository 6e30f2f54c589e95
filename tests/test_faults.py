"""Issue 9, faults on real processes: a pauser that dies, syncs whose adapter cannot load."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from skyrl_lora.inference.client import FanOutError, InferenceError, RemoteInferenceClient

from .conftest import wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.gpu]

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def prompt(tok) -> list[int]:
    return tok("class Spam:\n    def eggs(self):")["input_ids"]


async def lora_info(client: RemoteInferenceClient, name: str):
    (state,) = await client.state()
    return next(lo for lo in state.loras if lo.name == name)


async def test_a_pauser_that_dies_is_outlived_by_its_lease(vllm_server, prompt, word_ids) -> None:
    """The process holding a tenant's pause is SIGKILLed before resuming: the lease runs out, the
    tenant resumes by itself and the requests that waited at its gate complete in full."""
    client = RemoteInferenceClient(vllm_server.url)
    code = ("import asyncio, sys, time; from skyrl_lora.inference.client import RemoteInferenceClient as C; "
            "c = C(sys.argv[1], owner='doomed-trainer'); asyncio.run(c.pause_generation('meow2', lease_s=4)); "
            "print('paused', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, vllm_server.url], stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)
        assert line.strip() == "paused"
        waiting = [asyncio.create_task(client.sample_with_retry(prompt, {"max_tokens": 6, **GREEDY}, "meow2"))
                   for _ in range(2)]
        await wait_for(lambda: _waiting(client, "meow2", 2), 30, "two requests waiting at the paused gate")
        assert "doomed-trainer" in (await lora_info(client, "meow2")).paused_by
        proc.kill()  # dies holding the pause
        await asyncio.to_thread(proc.wait, 30)
        done = await asyncio.wait_for(asyncio.gather(*waiting), 60)  # lease 4 s; generous deadline
        assert [s.token_ids for (s,) in done] == [[word_ids["meow"]] * 6] * 2
        assert not (await lora_info(client, "meow2")).paused_by
    finally:
        proc.kill()


async def _waiting(client: RemoteInferenceClient, name: str, count: int) -> bool:
    return (await lora_info(client, name)).waiting >= count


def _broken_adapters(tiny, root: Path) -> dict[str, Path]:
    """An adapter dir with a corrupt weights file, one whose rank exceeds the server's, one missing."""
    good = Path(tiny.loras["meow"])
    corrupt = root / "corrupt"
    shutil.copytree(good, corrupt)
    for weights in corrupt.glob("*.safetensors"):
        weights.write_bytes(b"\x00" * 64 + b"not a safetensors file")
    too_big = root / "rank-too-big"
    shutil.copytree(good, too_big)
    config = json.loads((too_big / "adapter_config.json").read_text())
    config["r"] = 4096
    (too_big / "adapter_config.json").write_text(json.dumps(config))
    return {"corrupt": corrupt, "rank": too_big, "missing": root / "does-not-exist"}


async def test_a_sync_that_cannot_load_keeps_the_old_adapter_serving(vllm_server, tiny, prompt, word_ids, tmp_path
                                                                     ) -> None:
    """Corrupt weights, a rank beyond the server's, a missing path: each sync fails with a 4xx naming
    lora_path; the tenant's in-flight requests finish untouched on the old adapter, nothing stays
    paused, and the next request still gets the old adapter."""
    client = RemoteInferenceClient(vllm_server.url)
    await client.load_lora_adapter("faulty", str(tiny.loras["meow"]), load_inplace=False)
    try:
        version = (await lora_info(client, "faulty")).version
        runs = [asyncio.create_task(client.sample_with_retry(prompt, {"max_tokens": 48, **GREEDY}, "faulty"))
                for _ in range(3)]

        async def generating() -> bool:
            info = await lora_info(client, "faulty")
            return info.in_flight >= 3 and info.in_flight_tokens >= 3
        await wait_for(generating, 60, "three requests generating")
        for kind, path in _broken_adapters(tiny, tmp_path).items():
            with pytest.raises(FanOutError) as fe:
                await client.update_lora("faulty", str(path))
            (err,) = fe.value.errors.values()
            assert isinstance(err, InferenceError) and 400 <= err.status < 500, (kind, err)
            assert "lora_path" in err.message, (kind, err.message)
            info = await lora_info(client, "faulty")
            assert info.version == version and not info.paused_by, kind
        done = await asyncio.wait_for(asyncio.gather(*runs), 120)
        for (s,) in done:
            assert s.token_ids == [word_ids["meow"]] * 48
            assert {v.version for v in s.version_spans} == {version}  # never aborted, never moved
        (after,) = await client.sample(prompt, {"max_tokens": 4, **GREEDY}, "faulty")
        assert after.token_ids == [word_ids["meow"]] * 4
        # and the tenant still syncs normally afterwards
        await client.update_lora("faulty", str(tiny.loras["woof"]))
        (now,) = await client.sample(prompt, {"max_tokens": 4, **GREEDY}, "faulty")
        assert now.token_ids == [word_ids["woof"]] * 4
    finally:
        await client.unload_lora_adapter("faulty")
