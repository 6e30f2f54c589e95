"""The multi-tenant trainer on the tiny model: learning, tenant isolation, the state tiers, checkpoints, bad input.

In-process (no Ray) so each test is seconds; on the device the same tests run on CUDA (``-m gpu``).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch

from skyrl_lora.errors import SkyrlError
from skyrl_lora.models.tiny import TinyFixtures
from skyrl_lora.training.config import TrainerConfig
from skyrl_lora.training.protocol import AdamParams, Datum, DistillPayload, DistillSample, DistillSettings, LoraSpec
from skyrl_lora.training.snapshot import TenantSnapshot
from skyrl_lora.training.trainer import MultiTenantTrainer

pytestmark = pytest.mark.gpu

BIG = 1 << 30
SPEC_A = LoraSpec(rank=8, alpha=16, seed=1)
SPEC_B = LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), seed=2)
ADAM = AdamParams(learning_rate=5e-3, weight_decay=0.01, grad_clip_norm=50.0)
PROMPT = "def main():\n    return"


def make_trainer(tiny: TinyFixtures, root: Path, **overrides) -> MultiTenantTrainer:
    fields = dict(base_model=str(tiny.base), state_dir=root / "state", sampler_root=root / "sampler",
                  resident_budget_bytes=BIG, cpu_budget_bytes=BIG, max_lora_rank=16)
    fields.update(overrides)
    trainer = MultiTenantTrainer(TrainerConfig(**fields))
    trainer.load()
    return trainer


def phrase_datum(tok, phrase: str, prompt: str = PROMPT, repeats: int = 6) -> Datum:
    p = tok.encode(prompt)
    word = tok.encode(phrase, add_special_tokens=False)
    seq = p + word * repeats
    weights = [0.0] * (len(p) - 1) + [1.0] * (len(word) * repeats)
    return Datum(model_input=seq[:-1], loss_fn_inputs={"target_tokens": seq[1:], "weights": weights})


def assert_same_state(a: TenantSnapshot, b: TenantSnapshot) -> None:
    assert a.step == b.step and a.spec == b.spec and a.layout == b.layout
    assert sorted(a.tensors) == sorted(b.tensors)
    for key in a.tensors:
        x, y = a.tensors[key], b.tensors[key]
        if not torch.cuda.is_available():
            assert torch.equal(x, y), f"{key} differs"  # bitwise on CPU
        else:  # CUDA attention backward may use atomics: equal up to float noise
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5, msg=f"{key} differs")


def step(trainer: MultiTenantTrainer, tenant: str, data: list[Datum]) -> float:
    loss = trainer.forward_backward(tenant, data).loss
    trainer.optim_step(tenant, ADAM)
    return loss


def metric(trainer: MultiTenantTrainer, name: str, tier: str) -> float:
    m = re.search(rf'^{name}{{tier="{tier}"}} ([0-9.e+-]+)$', trainer.metrics.render(), re.M)
    assert m, f"{name}{{tier={tier}}} not exported"
    return float(m.group(1))


def test_cross_entropy_teaches_a_phrase(tiny: TinyFixtures, tok, tmp_path: Path) -> None:
    trainer = make_trainer(tiny, tmp_path)
    trainer.create_lora("parrot", LoraSpec(rank=8, alpha=16))
    data = [phrase_datum(tok, " woof")] * 4
    losses = [step(trainer, "parrot", data) for _ in range(10)]
    assert losses[-1] < 0.05 * losses[0], losses
    ids = torch.tensor([tok.encode(PROMPT)], device=trainer.device)
    out = trainer.slots.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                       do_sample=False, pad_token_id=0)
    assert tok.decode(out[0, ids.shape[1]:]) == " woof" * 4


def test_concurrent_first_calls_load_the_base_once(tiny: TinyFixtures, tmp_path: Path) -> None:
    trainer = MultiTenantTrainer(TrainerConfig(base_model=str(tiny.base), state_dir=tmp_path / "s", sampler_root=tmp_path / "x"))
    threads = [threading.Thread(target=trainer.load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert trainer.loads == 1 and trainer.model is not None


def test_interleaved_tenants_equal_training_alone(tiny: TinyFixtures, tok, tmp_path: Path) -> None:
    """Two tenants of different shapes share one slot's budget, so every switch evicts the other one."""
    data = {"a": [phrase_datum(tok, " woof")] * 2, "b": [phrase_datum(tok, " meow", prompt="x = ")] * 3}
    specs = {"a": SPEC_A, "b": SPEC_B}
    alone = {}
    for t in ("a", "b"):
        solo = make_trainer(tiny, tmp_path / f"solo-{t}")
        solo.create_lora(t, specs[t])
        for _ in range(4):
            step(solo, t, data[t])
        alone[t] = solo.snapshot(t)

    probe = make_trainer(tiny, tmp_path / "probe")
    probe.create_lora("a", SPEC_A)
    one_slot = probe.slots.slot_bytes(SPEC_A)
    shared = make_trainer(tiny, tmp_path / "shared", resident_budget_bytes=one_slot)
    for t in ("a", "b"):
        shared.create_lora(t, specs[t])
    for _ in range(4):
        for t, other in (("a", "b"), ("b", "a")):
            before = shared.snapshot(other)
            shared.forward_backward(t, data[t])
            assert_same_state(before, shared.snapshot(other))  # the other tenant is never touched
        for t in ("a", "b"):
            shared.optim_step(t, ADAM)
    assert metric(shared, "skyrl_trainer_cache_evictions_total", "resident") >= 8
    for t in ("a", "b"):
        assert_same_state(alone[t], shared.snapshot(t))


def test_state_survives_cpu_and_disk_tiers_bit_identically(tiny: TinyFixtures, tok, tmp_path: Path) -> None:
    data = [phrase_datum(tok, " woof")] * 2
    twin = make_trainer(tiny, tmp_path / "twin")
    twin.create_lora("a", SPEC_A)
    probe_bytes = twin.slots.slot_bytes(SPEC_A)
    # one slot resident, room for one tenant on CPU (weights + two moments + grads), the rest on disk
    tiered = make_trainer(tiny, tmp_path / "tiered", resident_budget_bytes=probe_bytes, cpu_budget_bytes=probe_bytes)
    for name in ("a", "b", "c"):
        tiered.create_lora(name, SPEC_A if name == "a" else LoraSpec(rank=8, alpha=16, seed=7))
    for trainer in (twin, tiered):
        for _ in range(2):
            step(trainer, "a", data)
        trainer.forward_backward("a", data)  # leave gradients pending across the evictions

    held = tiered.snapshot("a")
    assert held.has_grads
    tiered.make_resident("b")
    assert tiered.info("a").tier == "cpu"
    assert_same_state(held, tiered.snapshot("a"))
    tiered.make_resident("c")  # b goes to CPU, which pushes a (least recently used) to disk
    assert tiered.info("a").tier == "disk" and tiered.info("a").has_pending_grads
    assert tiered.info("b").tier == "cpu"
    assert_same_state(held, tiered.snapshot("a"))
    for tier in tiered.state().tiers:
        assert tier.budget_bytes is None or tier.nbytes <= tier.budget_bytes, tier

    assert tiered.make_resident("a") == "disk"
    assert_same_state(held, tiered.snapshot("a"))
    for trainer in (twin, tiered):
        trainer.optim_step("a", ADAM)
        for _ in range(2):
            step(trainer, "a", data)
    assert_same_state(twin.snapshot("a"), tiered.snapshot("a"))  # as if it had never left
    assert metric(tiered, "skyrl_trainer_cache_hits_total", "disk") >= 1
    assert metric(tiered, "skyrl_trainer_cache_evictions_total", "cpu") >= 1
    assert metric(tiered, "skyrl_trainer_switch_seconds_count", "disk") >= 1

    tiered.delete_lora("a")  # gone from every tier
    assert "a" not in tiered.tenants() and tiered.tiers.tier_of("a") is None
    assert not list((tmp_path / "tiered" / "state" / "disk_tier").glob("a.*"))


def test_full_budgets_refuse_new_tenants(tiny: TinyFixtures, tmp_path: Path) -> None:
    probe = make_trainer(tiny, tmp_path / "probe")
    need = probe.slots.slot_bytes(SPEC_A)
    trainer = make_trainer(tiny, tmp_path / "t", resident_budget_bytes=need, cpu_budget_bytes=0, disk_budget_bytes=need)
    trainer.create_lora("a", SPEC_A)
    trainer.create_lora("b", SPEC_A)  # a moves to disk
    with pytest.raises(SkyrlError) as err:
        trainer.create_lora("c", SPEC_A)
    assert err.value.status == 507
    assert trainer.tenants() == ["a", "b"] and trainer.info("a").tier == "disk"


def test_a_sampler_export_in_the_servers_dtype_is_the_weights_cast(tiny: TinyFixtures, tmp_path: Path) -> None:
    """save_weights_for_sampler writes the servers' dtype (TrainerConfig.sampler_dtype): each tensor is
    the trainer's parameter cast as vLLM would cast it on loading, so the served bits are unchanged."""
    from safetensors.torch import load_file

    trainer = make_trainer(tiny, tmp_path)
    trainer.create_lora("a", SPEC_A)
    params = {k: v.detach().clone() for k, v in trainer._activate("a").params.items()}
    full = load_file(str(trainer.export_for_sampler("a", "f32") / "adapter_model.safetensors"))
    half = load_file(str(trainer.export_for_sampler("a", "bf16", dtype=torch.bfloat16) / "adapter_model.safetensors"))
    assert set(full) == set(half) == set(params)
    for name, p in params.items():
        assert full[name].dtype == torch.float32 and half[name].dtype == torch.bfloat16
        assert torch.equal(full[name], p.float().cpu()) and torch.equal(half[name], p.to(torch.bfloat16).cpu())


def test_mixed_shapes_export_adapters_peft_reproduces(tiny: TinyFixtures, tok, tmp_path: Path) -> None:
    """Tenants differing in rank, alpha and targets (one with lm_head, Tinker's train_unembed); each exported
    adapter, loaded by peft, gives our logprobs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tiny, tmp_path)
    specs = {"r4": SPEC_B, "r8": SPEC_A,
             "r16": LoraSpec(rank=16, alpha=4, target_modules=("o_proj", "up_proj", "lm_head"), seed=3)}
    datum = phrase_datum(tok, " meow")
    for name, spec in specs.items():
        trainer.create_lora(name, spec)
        for _ in range(3):
            step(trainer, name, [datum])
    seen = set()
    for name in specs:
        ours = trainer.forward(name, [datum]).loss_fn_outputs[0]["logprobs"]
        path = trainer.export_for_sampler(name, "snap")
        base = AutoModelForCausalLM.from_pretrained(tiny.base, dtype=trainer.dtype).to(trainer.device)
        model = PeftModel.from_pretrained(base, str(path)).eval()
        ids = torch.tensor([datum.model_input], device=trainer.device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
        theirs = torch.log_softmax(logits, -1).gather(1, torch.tensor(datum.loss_fn_inputs["target_tokens"],
                                                                      device=trainer.device)[:, None])[:, 0]
        tol = 1e-4 if trainer.device.type == "cpu" else 5e-2  # bf16 base on CUDA
        torch.testing.assert_close(torch.tensor(ours), theirs.cpu(), rtol=tol, atol=tol)
        seen.add(round(sum(ours), 3))
    assert len(seen) == 3  # three different adapters, not one reused


def test_save_and_load_state_restart_continues_exactly(tiny: TinyFixtures, tok, tmp_path: Path) -> None:
    data = [phrase_datum(tok, " woof")] * 2
    first = make_trainer(tiny, tmp_path)
    first.create_lora("a", SPEC_A)
    for _ in range(2):
        step(first, "a", data)
    saved = first.save_state("a", "ckpt-2")
    first_state_at_2_weights = first.snapshot("a").tensors["w"].clone()
    assert saved.step == 2 and Path(saved.path).is_file()
    for _ in range(2):
        step(first, "a", data)

    restarted = make_trainer(tiny, tmp_path)  # a new process would see the same state_dir
    info = restarted.load_state("a", saved.path)
    assert info.step == 2 and info.spec == SPEC_A
    for _ in range(2):
        step(restarted, "a", data)
    assert_same_state(first.snapshot("a"), restarted.snapshot("a"))

    weights_only = make_trainer(tiny, tmp_path)
    weights_only.load_state("b", saved.path, with_optimizer=False)
    snap = weights_only.snapshot("b")
    assert float(snap.tensors["m"].abs().sum()) == 0 and float(snap.tensors["t"][0]) == 0  # a fresh optimizer
    assert torch.equal(snap.tensors["w"], first_state_at_2_weights)


def test_distill_step_pulls_student_towards_teacher(tiny: TinyFixtures, tok, tmp_path: Path) -> None:
    trainer = make_trainer(tiny, tmp_path)
    prompt = tok.encode(PROMPT)
    response = tok.encode(" woof woof woof", add_special_tokens=False)
    woof, meow = (tok.encode(w, add_special_tokens=False)[0] for w in (" woof", " meow"))
    sample = DistillSample(prompt="p", response="r", feedback="say woof", prompt_token_ids=prompt,
                           response_token_ids=response,
                           teacher_topk_ids=[[woof, meow]] * len(response),
                           teacher_topk_logprobs=[[-0.05, -3.0]] * len(response))
    payload = DistillPayload(lora_id="student", settings=DistillSettings(lr=5e-3, rank=8, alpha=16, teacher_top_k=2),
                             samples=[sample])
    kls = [trainer.distill_step(payload).forward_backward.metrics["kl:sum"] for _ in range(15)]
    assert kls[-1] < 0.2 * kls[0], kls
    with pytest.raises(SkyrlError) as err:
        trainer.distill_step(payload.model_copy(update={"settings": DistillSettings(alpha=3.0)}))
    assert err.value.field == "settings.alpha"
    with pytest.raises(ValueError):
        DistillPayload(lora_id="student", samples=[])


BAD_INPUTS = [
    ("ghost", lambda t: [Datum(model_input=[1, 2], loss_fn_inputs={"target_tokens": [2, 3]})], "cross_entropy", 404, "tenant"),
    ("a", lambda t: [], "cross_entropy", 400, "data"),
    ("a", lambda t: [Datum(model_input=[1, 99999], loss_fn_inputs={"target_tokens": [2, 3]})], "cross_entropy",
     400, "data[0].model_input"),
    ("a", lambda t: [Datum(model_input=[1, 2], loss_fn_inputs={"target_tokens": [2, -1]})], "cross_entropy",
     400, "data[0].loss_fn_inputs.target_tokens"),
    ("a", lambda t: [Datum(model_input=[1, 2, 3], loss_fn_inputs={"target_tokens": [2, 3]})], "cross_entropy",
     400, "data[0].loss_fn_inputs.target_tokens"),
    ("a", lambda t: [Datum(model_input=[1, 2], loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0]})],
     "cross_entropy", 400, "data[0].loss_fn_inputs.weights"),
    ("a", lambda t: [Datum(model_input=[1, 2], loss_fn_inputs={"target_tokens": [2, 3], "logprobs": [0.0, 0.0]})],
     "ppo", 400, "data[0].loss_fn_inputs.advantages"),
    ("a", lambda t: [Datum(model_input=[1, 2], loss_fn_inputs={"target_tokens": [2, 3], "bogus": [0.0, 0.0]})],
     "cross_entropy", 400, "data[0].loss_fn_inputs.bogus"),
    ("a", lambda t: [Datum(model_input=[1, 2], loss_fn_inputs={"target_tokens": [2, 3], "weights": [float("nan"), 1.0]})],
     "cross_entropy", 400, "data[0].loss_fn_inputs.weights"),
    ("a", lambda t: [Datum(model_input=[1, 2], loss_fn_inputs={"target_tokens": [2, 3]})], "nope", 400, "loss_fn"),
]


@pytest.mark.parametrize(("tenant", "make", "loss", "status", "field"), BAD_INPUTS)
def test_bad_input_is_refused_and_corrupts_nothing(tiny: TinyFixtures, tok, tmp_path: Path, tenant, make, loss,
                                                   status, field) -> None:
    trainer = make_trainer(tiny, tmp_path)
    trainer.create_lora("a", SPEC_A)
    step(trainer, "a", [phrase_datum(tok, " woof")])
    trainer.forward_backward("a", [phrase_datum(tok, " woof")])  # pending gradients must survive too
    before = trainer.snapshot("a")
    with pytest.raises(SkyrlError) as err:
        trainer.forward_backward(tenant, make(tok), loss)
    assert (err.value.status, err.value.field) == (status, field), err.value.message
    assert_same_state(before, trainer.snapshot("a"))


def test_bad_lora_requests(tiny: TinyFixtures, tmp_path: Path) -> None:
    trainer = make_trainer(tiny, tmp_path)
    cases = [(("a", LoraSpec(rank=32)), 400, "rank"),
             (("a", LoraSpec(rank=4, target_modules=("qkv_proj",))), 400, "target_modules"),
             (("a", LoraSpec(rank=4, target_modules=("q_proj", "embed_tokens"))), 400, "target_modules"),
             (("bad/name", LoraSpec(rank=4)), 400, "tenant")]
    for args, status, field in cases:
        with pytest.raises(SkyrlError) as err:
            trainer.create_lora(*args)
        assert (err.value.status, err.value.field) == (status, field)
    trainer.create_lora("a", LoraSpec(rank=4))
    with pytest.raises(SkyrlError) as err:
        trainer.create_lora("a", LoraSpec(rank=4))
    assert err.value.status == 409
    with pytest.raises(SkyrlError) as err:
        trainer.optim_step("a", ADAM)
    assert err.value.status == 409  # nothing accumulated yet
    with pytest.raises(SkyrlError) as err:
        trainer.load_state("a", str(tmp_path / "elsewhere.safetensors"))
    assert (err.value.status, err.value.field) == (403, "path")
    assert trainer.tenants() == ["a"]
