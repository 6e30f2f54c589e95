"""A server restarting just after a publication: the manifest may name a version whose durable copy
the trainer is still writing (it is written after ``save_weights_for_sampler`` returns). The server
restores every other tenant first, waits a bounded time for that copy, and gives up on a copy that
never comes without failing its start. The loader's logic, with a controller that records calls;
the real restart is ``test_server_restart.py``."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from skyrl_lora.inference.server import EmbeddedVLLMServer, ServerConfig, wait_for_paths


class _Controller:
    def __init__(self) -> None:
        self.loaded: list[tuple[str, str]] = []

    async def load(self, name: str, path: str, *, load_inplace: bool) -> None:
        self.loaded.append((name, path))


class _Manifest:
    def __init__(self, current: dict[str, str | None]) -> None:
        self._current = current

    def current(self) -> dict[str, str | None]:
        return self._current


async def test_paths_are_waited_for_until_they_appear_or_the_deadline(tmp_path: Path) -> None:
    late, never = tmp_path / "late", tmp_path / "never"
    waiting = asyncio.create_task(wait_for_paths({str(late), str(never)}, timeout_s=0.5, poll_s=0.01))
    late.mkdir()
    assert await asyncio.wait_for(waiting, 30) == {str(late)}
    assert await wait_for_paths(set(), timeout_s=0.0) == set()


async def test_a_restart_restores_the_others_first_and_gives_a_missing_copy_up(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    here, late, never = tmp_path / "here", tmp_path / "late", tmp_path / "never"
    here.mkdir()
    server = EmbeddedVLLMServer(ServerConfig(model="unused", restore_wait_s=5.0))
    controller = _Controller()
    manifest = _Manifest({"late": str(late), "here": str(here), "gone": None})

    async def appear_once_the_others_are_restored() -> None:
        while not controller.loaded:
            await asyncio.sleep(0)
        late.mkdir()

    creator = asyncio.create_task(appear_once_the_others_are_restored())
    await asyncio.wait_for(server._load_initial_adapters(controller, manifest), 30)
    await creator
    assert controller.loaded == [("here", str(here)), ("late", str(late))]

    fast = EmbeddedVLLMServer(ServerConfig(model="unused", restore_wait_s=0.05))
    controller = _Controller()
    with caplog.at_level(logging.ERROR):
        await asyncio.wait_for(fast._load_initial_adapters(controller, _Manifest({"n": str(never), "h": str(here)})), 30)
    assert controller.loaded == [("h", str(here))]
    assert any("did not appear" in r.getMessage() and "LoRA n" in r.getMessage() for r in caplog.records)

