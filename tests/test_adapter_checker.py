"""The adapter check run in processes of its own (AdapterChecker): the same verdicts as in the
server's process, refusals that cross back as themselves, and a checker that dies is replaced."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from skyrl_lora.inference.adapter_check import AdapterChecker, AdapterCheckError, check_adapter


def _with_nan(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    tensors = load_file(out / "adapter_model.safetensors")
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, out / "adapter_model.safetensors")
    return out


async def test_checker_processes_give_the_server_processes_verdicts(tiny, tmp_path: Path) -> None:
    good = Path(tiny.loras["meow"])
    bad = _with_nan(good, tmp_path / "nan")
    with pytest.raises(AdapterCheckError) as here:
        check_adapter(bad, None, 16)
    checker = AdapterChecker(1)
    try:
        await checker.check(good, None, 16)
        with pytest.raises(AdapterCheckError) as there:
            await checker.check(bad, None, 16)
        assert (there.value.status, there.value.field, there.value.message) == (400, "lora_path", here.value.message)
        assert "NaN or Inf" in there.value.message
        with pytest.raises(AdapterCheckError, match="exceeds the server's max_lora_rank"):
            await checker.check(good, None, 1)
    finally:
        checker.close()


async def test_a_checker_process_that_dies_is_replaced(tiny) -> None:
    good = Path(tiny.loras["meow"])
    checker = AdapterChecker(1)
    try:
        await checker.check(good, None, 16)
        pool = checker._pool
        assert pool is not None
        for pid in list(pool._processes):  # the pool's own children
            os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(checker.check(good, None, 16), timeout=60)  # checked here meanwhile
        assert checker._pool is not pool
        await asyncio.wait_for(checker.check(good, None, 16), timeout=60)  # and by the new process
    finally:
        checker.close()
