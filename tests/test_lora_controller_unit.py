"""``LoraController`` against a fake engine: the per-tenant gate, targeted abort, versioned swaps and
pause leases as pure asyncio logic, in milliseconds. The same behaviours against a real vLLM engine
are ``test_inference_plane.py``; this file pins the controller's own rules without one."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from skyrl_lora.inference.lora_control import LoraController, LoraError


class FakeEngine:
    """What the controller uses of vLLM's AsyncLLM: generate (one output per tick until aborted or
    done), the request registry it sweeps, abort, adapters and the engine-wide pause."""

    def __init__(self, hf_config: Any) -> None:
        self.vllm_config = SimpleNamespace(lora_config=SimpleNamespace(max_lora_rank=16, max_loras=8))
        self.model_config = SimpleNamespace(hf_config=hf_config, max_model_len=1024, get_vocab_size=lambda: 1024)
        self.output_processor = SimpleNamespace(request_states={})
        self.aborted: set[str] = set()
        self.adapters: dict[int, str] = {}  # engine lora id -> engine adapter name
        self.paused = False

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any,
                       lora_request: Any = None, **kwargs: Any):
        name = None if lora_request is None else lora_request.lora_name
        self.output_processor.request_states[request_id] = SimpleNamespace(lora_name=name)
        try:
            for i in range(sampling_params["ticks"]):
                await asyncio.sleep(0.005)
                if request_id in self.aborted:
                    yield SimpleNamespace(lora=name, index=i, finish="abort")
                    return
                yield SimpleNamespace(lora=name, index=i, finish=None)
        finally:
            self.output_processor.request_states.pop(request_id, None)

    async def abort(self, request_ids: Any, internal: bool = False) -> None:
        self.aborted.update([request_ids] if isinstance(request_ids, str) else request_ids)

    async def add_lora(self, request: Any) -> bool:
        self.adapters[request.lora_int_id] = request.lora_name
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        return self.adapters.pop(lora_id, None) is not None

    async def pause_generation(self, mode: str = "keep", clear_cache: bool = False) -> None:
        self.paused = True

    async def resume_generation(self) -> None:
        self.paused = False


@pytest.fixture
def controller(tiny):
    from transformers import AutoConfig

    engine = FakeEngine(AutoConfig.from_pretrained(tiny.base))
    return LoraController(engine, drain_timeout_s=5.0, stage_off_loop=False), engine


async def _until(condition: Any, timeout_s: float = 10.0) -> None:
    """Wait for a condition, with a deadline (no sleep that hopes for timing)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


async def _run(controller: LoraController, rid: str, lora: str | None, ticks: int = 40) -> list[Any]:
    from skyrl_lora.inference import vllm_compat as compat

    request = None if lora is None else compat.make_lora_request(lora, 1, "-")
    return [out async for out in controller.generate([1, 2], {"ticks": ticks}, rid, lora_request=request)]


async def test_pause_stops_only_that_tenant_and_holds_its_new_requests(controller, tiny) -> None:
    ctl, engine = controller
    await ctl.load("a", str(tiny.loras["meow"]), load_inplace=False)
    await ctl.load("b", str(tiny.loras["woof"]), load_inplace=False)
    a = asyncio.ensure_future(_run(ctl, "ra", "a"))
    b = asyncio.ensure_future(_run(ctl, "rb", "b"))
    await _until(lambda: len(engine.output_processor.request_states) == 2)  # both generating
    aborted, drained = await ctl.pause("a", "owner-1", lease_s=30)
    assert aborted == 1 and drained
    assert (await a)[-1].finish == "abort"
    held = asyncio.ensure_future(_run(ctl, "ra2", "a", ticks=3))
    await _until(lambda: ctl.info("a").waiting == 1)  # it waits at a's gate
    assert not held.done()
    out_b = await b
    assert len(out_b) == 40 and out_b[-1].finish is None  # b never noticed
    assert not ctl.resume("a", "owner-1")  # the gate opens: no owner left
    out = await asyncio.wait_for(held, 5)
    assert [o.finish for o in out] == [None] * 3


async def test_a_swap_serves_the_new_version_and_retires_the_old_one_once_unused(controller, tiny) -> None:
    ctl, engine = controller
    first, _, _ = await ctl.load("a", str(tiny.loras["meow"]), load_inplace=False)
    running = asyncio.ensure_future(_run(ctl, "r1", "a"))
    await _until(lambda: "r1" in engine.output_processor.request_states)
    second, aborted, _ = await ctl.load("a", str(tiny.loras["woof"]), load_inplace=True, mode="abort")
    assert second.version == first.version + 1 and second.lora_id != first.lora_id and aborted == 1
    assert (await running)[-1].finish == "abort"  # the old version's request was stopped
    out = await _run(ctl, "r2", "a", ticks=2)
    assert {o.lora for o in out} == {second.engine_name}  # new requests get the new version

    await _until(lambda: first.lora_id not in engine.adapters)  # removed once no request used it
    assert second.lora_id in engine.adapters


async def test_a_crashed_pauser_never_leaves_a_tenant_paused(controller, tiny) -> None:
    ctl, _ = controller
    await ctl.load("a", str(tiny.loras["meow"]), load_inplace=False)
    await ctl.pause("a", "gone-owner", lease_s=0.2)  # it never resumes
    out = await asyncio.wait_for(_run(ctl, "r", "a", ticks=2), 5)  # the lease runs out, the gate opens
    assert len(out) == 2


async def test_engine_wide_pause_and_unknown_tenants(controller, tiny) -> None:
    ctl, engine = controller
    await ctl.pause(None, "o", lease_s=30)
    assert engine.paused
    ctl.resume(None, "o")
    await _until(lambda: not engine.paused)
    with pytest.raises(LoraError) as err:
        await _run(ctl, "r", "nobody")
    assert err.value.status == 404 and err.value.field == "lora_name"
    with pytest.raises(LoraError):
        await ctl.abort_lora_requests("nobody")


class StagingFakeEngine(FakeEngine):
    """The fake engine's workers stage through ``collective_rpc`` at once (a version is staged as
    soon as it is asked for), and record every call, as the engine's loop would see them."""

    def __init__(self, hf_config: Any) -> None:
        super().__init__(hf_config)
        self.rpcs: list[str] = []
        self.staged: dict[int, str] = {}

    async def collective_rpc(self, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        from skyrl_lora.inference.stage_channel import NOT_STAGED

        self.rpcs.append(method)
        if method == "skyrl_stage_lora":
            self.staged[args[0]] = args[2]
            return [None]
        if method == "skyrl_stage_status":
            return ["ok" if self.staged.get(args[0]) == args[1] else NOT_STAGED]
        if method == "skyrl_discard_lora":
            self.staged.pop(args[0], None)
        return [None]


@pytest.fixture
def channel():
    from skyrl_lora.inference.stage_channel import ServerStageChannel

    opened = ServerStageChannel.open()
    assert opened is not None
    yield opened
    opened.close()


async def test_staging_over_the_channel_never_calls_the_engine(tiny, channel) -> None:
    """The command reaches the worker's thread and its notice ends the wait: no collective_rpc."""
    from transformers import AutoConfig

    from skyrl_lora.inference.stage_channel import WorkerStageChannel

    engine = StagingFakeEngine(AutoConfig.from_pretrained(tiny.base))
    worker = WorkerStageChannel(channel.name, lambda c: worker.notify(c.lora_int_id, c.lora_path, "ok"))
    channel.start([worker.name])
    controller = LoraController(engine, stage_off_loop=True, channel=channel)
    staged = await controller.stage("meow", str(tiny.loras["meow"]))
    assert engine.rpcs == [] and controller.stage_asks == 0 and channel.received == 1
    await controller.discard(staged.stage_id)


async def test_a_lost_command_is_sent_through_the_engine_after_the_backstop(tiny, channel) -> None:
    """A worker that never hears the command (a dropped datagram): the backstop ask finds nothing
    staged, the command goes through collective_rpc, and staging still succeeds."""
    import socket
    import uuid

    from transformers import AutoConfig

    engine = StagingFakeEngine(AutoConfig.from_pretrained(tiny.base))
    deaf_name = f"skyrl-test-deaf-worker-{uuid.uuid4().hex}"
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deaf.bind("\0" + deaf_name)  # takes datagrams and never reads them
    try:
        channel.start([deaf_name])
        controller = LoraController(engine, stage_off_loop=True, channel=channel)
        staged = await asyncio.wait_for(controller.stage("meow", str(tiny.loras["meow"])), 30)
        assert channel.commands == 1  # sent, and lost
        assert engine.rpcs == ["skyrl_stage_status", "skyrl_stage_lora", "skyrl_stage_status"], engine.rpcs
        await controller.discard(staged.stage_id)
    finally:
        deaf.close()
