"""Slot images the trainer lays out itself (inference/slot_image.py): bit for bit what a builder makes
of the same weights as files, refused where the plan cannot hold them, and manifests checked. The
real server's side is ``test_staging.py::test_trainer_publishes_through_shared_memory_and_keeps_a_durable_copy``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from skyrl_lora.inference.slot_builder import BuildJob, BuildPlan, PlanEntry, build_image
from skyrl_lora.inference.slot_image import (
    IMAGE_FILE,
    MANIFEST_FILE,
    FlatWeights,
    ImageUnfit,
    ShareBuffers,
    _whole_order,
    assemble,
    plan_digest,
    read_manifest,
    write_image,
)

from .test_slot_builder import ABSENT, PLAN, A, B, _adapter, _read


def test_a_trainers_image_is_the_builders_image_of_the_same_weights(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    weights = {A: torch.randn(4, 6, generator=gen), B: torch.randn(5, 4, generator=gen)}  # float32, as trained
    built = tmp_path / "built"
    build_image(PLAN, BuildJob(adapter_dir=str(_adapter(tmp_path / "ad", weights)), out_path=str(built), scaling=1.875))
    out = tmp_path / "published"
    out.mkdir()
    manifest = write_image(out, PLAN, weights, 1.875)
    assert manifest.plan_digest == plan_digest(PLAN) and manifest.shapes == [[4, 6], [5, 4], []]
    assert (out / IMAGE_FILE).read_bytes() == built.read_bytes()
    assert read_manifest(out) == manifest
    assert _read(out / IMAGE_FILE)[48:88].view(5, 8)[:, 4:].eq(0).all()  # padding to the slot's rank


def test_an_adapter_the_plan_cannot_hold_is_unfit() -> None:
    with pytest.raises(ImageUnfit, match="no slot for"):
        assemble(PLAN, {A: torch.zeros(4, 6), "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 6)}, 1.0)
    with pytest.raises(ImageUnfit, match=r"its slot is \[8, 6\]"):
        assemble(PLAN, {ABSENT: torch.zeros(9, 6)}, 1.0)  # a rank above the server's


def test_manifests_are_checked(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None  # a plain peft directory
    write_image(tmp_path, PLAN, {A: torch.ones(4, 6)}, 2.0)
    with open(tmp_path / IMAGE_FILE, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="has 10 bytes"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text('{"plan_digest": "x", "dtype": "int8"}')
    with pytest.raises(ValueError, match="not a slot image manifest"):
        read_manifest(tmp_path)


def test_flat_weights_make_the_same_image_as_named_tensors() -> None:
    """A trainer slot's flat buffer (FlatWeights) takes the fast way where every tensor fills its
    slot whole and the dict way otherwise; either way the same bits as from named tensors."""
    gen = torch.Generator().manual_seed(2)
    whole = BuildPlan(dtype="bfloat16", numel=8 * 6 + 5 * 8 + 8 * 6, entries=[
        PlanEntry(offset=0, rows=8, cols=6, source=A, scaled=False),
        PlanEntry(offset=48, rows=5, cols=8, source=B, scaled=True),
        PlanEntry(offset=88, rows=8, cols=6, source=ABSENT, scaled=False)])
    for plan, shapes in ((whole, {A: (8, 6), B: (5, 8)}), (PLAN, {A: (4, 6), B: (5, 4)})):
        layout = [(B, shapes[B]), (A, shapes[A])]  # buffer order need not be the plan's
        flat = FlatWeights(torch.randn(sum(r * c for r, c in shapes.values()), generator=gen), layout)
        assert (_whole_order(plan, flat.layout) is not None) == (plan is whole)  # which way it takes
        image, got_shapes = assemble(plan, flat, 1.875)
        want, want_shapes = assemble(plan, flat.named(), 1.875)
        assert got_shapes == want_shapes and torch.equal(image.view(torch.int16), want.view(torch.int16))
        assert image[88:].eq(0).all()  # the absent tensor's slot
    with pytest.raises(ImageUnfit, match="no slot for"):
        assemble(whole, FlatWeights(torch.zeros(48), [("base_model.model.lm_head.lora_A.weight", (8, 6))]), 1.0)
    with pytest.raises(ValueError, match="the layout holds 48"):
        FlatWeights(torch.zeros(47), [(A, (8, 6))])


def test_reused_buffers_make_each_version_as_fresh_ones_do() -> None:
    """The colocated trainer's buffers (ShareBuffers) are lent again once given back, with their split
    made once; versions written through them are bit for bit those made into fresh buffers, and a
    dropped buffer is never lent again."""
    gen = torch.Generator().manual_seed(4)
    plan = BuildPlan(dtype="bfloat16", numel=8 * 6 + 5 * 8, entries=[
        PlanEntry(offset=0, rows=8, cols=6, source=A, scaled=False),
        PlanEntry(offset=48, rows=5, cols=8, source=B, scaled=True)])
    layout = [(B, (5, 8)), (A, (8, 6))]
    images, copies = ShareBuffers(), ShareBuffers()
    lent = []
    for _ in range(3):
        weights = torch.randn(88, generator=gen)
        copy = copies.take(88, torch.bfloat16, weights.device)
        copy.copy_(weights)
        flat = FlatWeights(copy, layout, copies)
        out = images.take(plan.numel, torch.bfloat16, weights.device)
        image, _ = assemble(plan, flat, 1.875, out, images)
        want, _ = assemble(plan, FlatWeights(weights.to(torch.bfloat16), layout), 1.875)
        assert image is out and torch.equal(image.view(torch.int16), want.view(torch.int16))
        lent.append((out, copy))
        images.give_back(out)
        copies.give_back(copy)
    assert all(o is lent[0][0] and c is lent[0][1] for o, c in lent)  # the same two buffers each time
    assert images.split(lent[0][0], [48, 40]) is images.split(lent[0][0], [48, 40])  # made once
    assert [v.numel() for v in images.split(lent[0][0], [8, 80])] == [8, 80]  # other sizes: made anew
    images.drop(images.take(plan.numel, torch.bfloat16, "cpu"))
    assert images.take(plan.numel, torch.bfloat16, "cpu") is not lent[0][0]  # dropped: a new one
    few = ShareBuffers(max_free=2)
    bufs = [few.take(8, torch.float32, "cpu") for _ in range(3)]
    for b in bufs:
        few.split(b, [4, 4])
        few.give_back(b)
    assert len(few._splits) == 2 and id(bufs[0]) not in few._splits  # the oldest went, split and all
    taken = [few.take(8, torch.float32, torch.device("cpu")) for _ in range(3)]
    assert [any(t is b for t in taken) for b in bufs] == [False, True, True]


def test_flat_weights_save_a_safetensors_file_that_loads_back(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(3)
    layout = [(B, (5, 3)), (A, (3, 6)), (ABSENT, (1, 1))]
    for dtype in (torch.bfloat16, torch.float32):
        flat = FlatWeights(torch.randn(15 + 18 + 1, generator=gen).to(dtype), layout)
        flat.save(tmp_path / "a.safetensors")
        loaded = load_file(str(tmp_path / "a.safetensors"))
        assert loaded.keys() == flat.named().keys()
        for name, tensor in flat.named().items():
            assert loaded[name].dtype == dtype and torch.equal(loaded[name], tensor)
        with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
            assert f.get_slice(A).get_shape() == [3, 6]
    with pytest.raises(ValueError, match="no safetensors name"):
        FlatWeights(torch.zeros(1, dtype=torch.int8), [(A, (1, 1))]).save(tmp_path / "b.safetensors")
