"""The out-of-process slot image builder (issue 16): its layout rules on small tensors, and its
process pool for real (children started, used, killed and replaced). The bit-for-bit comparison with
vLLM's own load is ``test_staging.py::test_a_flip_from_a_slot_image_fills_the_slot_as_vllms_own_load``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from skyrl_lora.inference.slot_builder import (
    BuilderPool,
    BuilderUnavailable,
    BuildJob,
    BuildPlan,
    PlanEntry,
    UnplannedAdapter,
    build_image,
    read_image,
)

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
ABSENT = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
# A: rank 4 padded to 8 rows of 6; B: 5 rows padded to rank 8 columns; a slot the adapter does not fill
PLAN = BuildPlan(dtype="bfloat16", numel=8 * 6 + 5 * 8 + 8 * 6, entries=[
    PlanEntry(offset=0, rows=8, cols=6, source=A, scaled=False),
    PlanEntry(offset=48, rows=5, cols=8, source=B, scaled=True),
    PlanEntry(offset=88, rows=8, cols=6, source=ABSENT, scaled=False)])


def _adapter(root: Path, tensors: dict[str, torch.Tensor]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    return root


def _read(path: Path) -> torch.Tensor:
    return torch.from_file(str(path), shared=False, size=PLAN.numel, dtype=torch.bfloat16)


def test_an_image_is_each_tensor_cast_scaled_and_padded_into_its_slot(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=gen), torch.randn(5, 4, generator=gen)
    adapter = _adapter(tmp_path / "ad", {A: a, B: b})
    out = tmp_path / "image"
    shapes = build_image(PLAN, BuildJob(adapter_dir=str(adapter), out_path=str(out), scaling=2.5))
    assert shapes == [[4, 6], [5, 4], []]
    image = _read(out)
    want_b = b.to(torch.bfloat16)
    want_b *= 2.5  # in bf16, as vLLM's optimize() scales lora_B
    assert image[:48].view(8, 6)[:4].equal(a.to(torch.bfloat16))
    assert image[:48].view(8, 6)[4:].eq(0).all()  # rank padding
    assert image[48:88].view(5, 8)[:, :4].equal(want_b) and image[48:88].view(5, 8)[:, 4:].eq(0).all()
    assert image[88:].eq(0).all()  # a module the adapter leaves out: zeros, as vLLM's reset_lora


def test_a_builders_kept_memory_leaves_nothing_of_the_last_version(tmp_path: Path) -> None:
    """A builder assembles every image in one tensor it keeps; a slice the next adapter leaves out
    must be zeros again, not the previous version's weights. The worker reads the file back whole."""
    scratch = torch.empty(PLAN.numel, dtype=torch.bfloat16)
    full = _adapter(tmp_path / "full", {A: torch.ones(4, 6), B: torch.ones(5, 4), ABSENT: torch.ones(8, 6)})
    part = _adapter(tmp_path / "part", {A: torch.ones(4, 6), B: torch.ones(5, 4)})
    build_image(PLAN, BuildJob(adapter_dir=str(full), out_path=str(tmp_path / "i1"), scaling=1.0), scratch)
    assert _read(tmp_path / "i1")[88:].eq(1).all()
    build_image(PLAN, BuildJob(adapter_dir=str(part), out_path=str(tmp_path / "i2"), scaling=1.0), scratch)
    back = torch.full((PLAN.numel,), 7.0, dtype=torch.bfloat16)
    read_image(str(tmp_path / "i2"), back)
    assert back.equal(_read(tmp_path / "i2")) and back[88:].eq(0).all()
    with pytest.raises(ValueError, match="shorter"):
        read_image(str(tmp_path / "i2"), torch.empty(PLAN.numel + 1, dtype=torch.bfloat16))


def test_adapters_the_plan_cannot_place_are_refused(tmp_path: Path) -> None:
    extra = _adapter(tmp_path / "extra", {A: torch.zeros(4, 6), B: torch.zeros(5, 4),
                                           "base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(4, 6)})
    with pytest.raises(UnplannedAdapter, match="embed_tokens"):
        build_image(PLAN, BuildJob(adapter_dir=str(extra), out_path=str(tmp_path / "i1"), scaling=1.0))
    wide = _adapter(tmp_path / "wide", {A: torch.zeros(9, 6), B: torch.zeros(5, 4)})
    with pytest.raises(ValueError, match=r"\[9, 6\]"):
        build_image(PLAN, BuildJob(adapter_dir=str(wide), out_path=str(tmp_path / "i2"), scaling=1.0))


def test_the_pool_builds_in_child_processes_and_replaces_a_dead_one(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "ad", {A: torch.ones(4, 6), B: torch.ones(5, 4)})
    pool = BuilderPool(PLAN, processes=1, timeout_s=60)
    try:
        job = BuildJob(adapter_dir=str(adapter), out_path=str(tmp_path / "i1"), scaling=2.0)
        assert pool.build(job).shapes == [[4, 6], [5, 4], []]
        assert float(_read(tmp_path / "i1")[48]) == 2.0
        missing = pool.build(BuildJob(adapter_dir=str(tmp_path / "nowhere"), out_path=str(tmp_path / "i2"),
                                      scaling=1.0))
        assert missing.error is not None and "nowhere" in missing.error and not (tmp_path / "i2").exists()
        (child,) = list(pool._idle.queue)
        child.kill()  # between jobs: replaced before the next one
        child.wait(timeout=10)
        again = pool.build(BuildJob(adapter_dir=str(adapter), out_path=str(tmp_path / "i3"), scaling=1.0))
        assert again.error is None and (tmp_path / "i3").is_file()
        (child,) = list(pool._idle.queue)
        child.kill()
        child.wait(timeout=10)
        child.poll = lambda: None  # as if it died just after the pool looked: this job says so, a new child takes over
        with pytest.raises(BuilderUnavailable):
            pool.build(BuildJob(adapter_dir=str(adapter), out_path=str(tmp_path / "i4"), scaling=1.0))
        assert pool.build(BuildJob(adapter_dir=str(adapter), out_path=str(tmp_path / "i5"), scaling=1.0)).error is None
    finally:
        pool.close()


def test_an_image_file_goes_when_the_last_view_of_it_does() -> None:
    """vLLM's CPU cache holds a built version as views of its mapped file; the file is unlinked on the
    reaper's thread after they are gone (never by the engine's thread dropping the last mapping)."""
    import gc
    import os
    import time

    from skyrl_lora.inference.vllm_compat.worker import ImageFiles

    files = ImageFiles()
    path = files.new_path()
    assert os.path.basename(path).startswith(f"skyrl-image-{os.getpid()}-")
    torch.arange(64, dtype=torch.bfloat16).view(torch.int16).numpy().tofile(path)

    class Model:  # stands for vLLM's LoRAModel: views of the mapping
        def __init__(self) -> None:
            self.view = torch.from_file(path, shared=True, size=64, dtype=torch.bfloat16)[8:16]

    model = Model()
    files.remove_when_dead(model, path)
    time.sleep(2 * ImageFiles.DELAY_S)  # longer than the reaper's delay: nothing is due while it lives
    assert os.path.exists(path) and model.view[0].item() == 8
    del model
    gc.collect()
    deadline = time.monotonic() + 10
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(path)


def test_image_files_of_a_dead_worker_are_swept(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from skyrl_lora.inference.vllm_compat.worker import IMAGE_PREFIX, ImageFiles, _image_dir

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = os.path.join(_image_dir(), f"{IMAGE_PREFIX}{child.pid}-test")
    mine = os.path.join(_image_dir(), f"{IMAGE_PREFIX}{os.getpid()}-test")
    for path in (dead, mine):
        Path(path).write_bytes(b"x")
    try:
        assert ImageFiles.sweep_dead_owners() >= 1
        assert not os.path.exists(dead) and os.path.exists(mine)
    finally:
        for path in (dead, mine):
            Path(path).unlink(missing_ok=True)
