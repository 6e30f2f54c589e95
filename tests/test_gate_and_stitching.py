"""Unit tests of pure logic: pause gates (owners, leases, epochs) and stitching of aborted samples."""

from __future__ import annotations

import asyncio

import pytest

from skyrl_lora.inference.gate import PauseGates
from skyrl_lora.inference.loadgen import reprefill_tokens
from skyrl_lora.inference.protocol import SampleOut, SamplingParamsIn, VersionSpan
from skyrl_lora.inference.stitching import StitchedSample, continuation_params, find_seam_stop


async def test_gate_owners_and_epochs() -> None:
    reopened: list[str | None] = []
    gates = PauseGates(on_reopen=reopened.append)
    assert not gates.is_paused("a") and gates.epoch("a") == 0
    assert gates.close("a", "o1", 60) is True
    assert gates.close("a", "o2", 60) is False  # already closed: same epoch
    assert gates.epoch("a") == 1 and gates.is_paused("a") and not gates.is_paused("b")
    assert gates.open("a", "o1") is False
    assert gates.open("a", "nobody") is False
    assert gates.open("a", "o2") is True and reopened == ["a"]
    assert gates.open("a", "o2") is True  # resume without pause: harmless
    gates.close("a", "o1", 60)
    assert gates.epoch("a") == 2
    gates.open("a", None)
    assert not gates.is_paused("a")


async def test_gate_waiters_released_by_lease_expiry() -> None:
    gates = PauseGates()
    gates.close("x", "dead-trainer", 0.05)
    waiter = asyncio.create_task(gates.wait_open("x"))
    await asyncio.wait_for(waiter, 5)
    assert not gates.is_paused("x")


async def test_gate_lease_renewal_and_bounds() -> None:
    gates = PauseGates()
    gates.close("x", "o", 0.05)
    gates.close("x", "o", 60)  # renewal extends the lease
    await asyncio.sleep(0.1)
    assert gates.is_paused("x")
    with pytest.raises(ValueError, match="lease_s"):
        gates.close("x", "o", 0)
    gates.forget("x")
    assert not gates.is_paused("x")


def _seg(tokens: list[int], reason: str, version: int) -> SampleOut:
    return SampleOut(token_ids=tokens, logprobs=[-0.1] * len(tokens), finish_reason=reason,
                     version_spans=[VersionSpan(version=version, start=0, end=len(tokens))] if tokens else [])


def test_stitching_concatenates_tokens_logprobs_and_versions() -> None:
    s = StitchedSample()
    s.add(_seg([1, 2, 3], "abort", 1))
    s.add(_seg([], "abort", 2))
    s.add(_seg([4, 5], "abort", 2))
    s.add(_seg([6], "length", 2))
    out = s.as_sample()
    assert out.token_ids == [1, 2, 3, 4, 5, 6] and len(out.logprobs) == 6
    assert out.finish_reason == "length" and s.segments == 4 and out.continuations == 3
    assert [(v.version, v.start, v.end) for v in out.version_spans] == [(1, 0, 3), (2, 3, 6)]
    with pytest.raises(ValueError):
        StitchedSample().add(SampleOut(token_ids=[1], logprobs=[], finish_reason="stop"))


def test_continuation_params_reduce_budget() -> None:
    p = SamplingParamsIn(max_tokens=10, min_tokens=4, seed=3)
    c = continuation_params(p, 3, 1)
    assert c is not None and c.max_tokens == 7 and c.min_tokens == 1 and c.seed != 3
    assert continuation_params(p, 10, 2) is None
    assert continuation_params(SamplingParamsIn(max_tokens=5), 2, 1).seed is None


def test_seam_stop_strings() -> None:
    vocab = {1: "ab", 2: "c", 3: "d", 4: "xy", 5: "END"}

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    # "bcd" starts in the tail ("ab") and ends in the new tokens ("c", "d"): keep 2 new tokens.
    assert find_seam_stop(decode, [1], [2, 3, 4], ["bcd"]) == (2, "bcd")
    # Entirely inside the new tokens: vLLM's own stop handling covers it, not the seam check.
    assert find_seam_stop(decode, [1], [4, 5], ["END"]) is None
    assert find_seam_stop(decode, [1], [2], []) is None
    assert find_seam_stop(decode, [], [2], ["c"]) is None


def test_adapter_paths_are_confined_to_the_roots(tmp_path) -> None:
    """No '..', no absolute path elsewhere, no symlink out of the roots; a real adapter inside passes."""
    from types import SimpleNamespace

    from skyrl_lora.inference.lora_control import LoraController, LoraError

    root = tmp_path / "adapters"
    inside = root / "tenant-a" / "v1"
    inside.mkdir(parents=True)
    (inside / "adapter_config.json").write_text('{"r": 8}')
    outside = tmp_path / "elsewhere" / "evil"
    outside.mkdir(parents=True)
    (outside / "adapter_config.json").write_text('{"r": 8}')
    (root / "tenant-b").mkdir()
    (root / "tenant-b" / "link").symlink_to(outside)
    ctl = SimpleNamespace(adapter_roots=[root.resolve()], _lora_cfg=SimpleNamespace(max_lora_rank=16))
    assert LoraController._check_path(ctl, str(inside)) == str(inside.resolve())
    for bad in (str(outside), str(root / ".." / "elsewhere" / "evil"), str(root / "tenant-b" / "link"), "/etc"):
        with pytest.raises(LoraError) as e:
            LoraController._check_path(ctl, bad)
        assert e.value.status == 403 and "lora_path" in e.value.message, bad


def test_reprefill_counts_only_continuations() -> None:
    """An abort sync's re-read tokens (bench.sync_stall): each continuation re-reads the prompt and
    the tokens before it; a version change without a cut (an in-place flip) costs none."""
    spans = [VersionSpan(version=1, start=0, end=3), VersionSpan(version=2, start=3, end=7),
             VersionSpan(version=3, start=7, end=9)]
    sample = SampleOut(token_ids=list(range(9)), logprobs=[0.0] * 9, finish_reason="length", version_spans=spans)
    assert reprefill_tokens(10, sample) == 0  # in place: versions changed, nothing was cut
    assert reprefill_tokens(10, sample.model_copy(update={"continuations": 2})) == (10 + 3) + (10 + 7)
    assert reprefill_tokens(10, sample.model_copy(update={"continuations": 1})) == 10 + 7
