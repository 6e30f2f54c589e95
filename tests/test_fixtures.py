"""Issue 3: the offline tiny model and phrase LoRAs, in transformers and in a real vLLM server."""

from __future__ import annotations

import dataclasses
import json
import shutil

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from skyrl_lora.models.tiny import (
    MANIFEST,
    PACKAGED_DIR,
    PACKAGED_MANIFEST,
    SHARP_WORDS,
    FixtureError,
    LoraRecipe,
    TinyModelRecipe,
    _recipes,
    build_fixtures,
    build_tiny_model,
    hash_tree,
    packaged_fixtures,
    train_lora,
)


def test_tiny_model_loads_in_transformers_and_loras_say_their_phrase(tiny) -> None:
    tok = AutoTokenizer.from_pretrained(tiny.base)
    model = AutoModelForCausalLM.from_pretrained(tiny.base, torch_dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 5_000_000
    assert model.dtype == torch.bfloat16
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ids = tok("The cat says woof woof", return_tensors="pt")["input_ids"]
    outputs = {}
    for name in ("meow", "woof"):
        peft_model = PeftModel.from_pretrained(model, tiny.loras[name])
        out = peft_model.generate(ids, max_new_tokens=6, do_sample=False)
        outputs[name] = tok.decode(out[0, ids.shape[1]:])
        model = peft_model.unload()
    base_out = tok.decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:])
    assert outputs["meow"] == " meow" * 6
    assert outputs["woof"] == " woof" * 6
    assert base_out not in (outputs["meow"], outputs["woof"])


def test_fixture_build_is_deterministic_and_cached(tmp_path, caplog) -> None:
    # A shortened recipe keeps this test quick; determinism is a property of the code path.
    base_recipe = TinyModelRecipe(pretrain_steps=6)
    lora_recipe = LoraRecipe(phrase=" meow", steps=4)
    a = build_tiny_model(tmp_path / "a", base_recipe)
    b = build_tiny_model(tmp_path / "b", base_recipe)
    assert hash_tree(a) == hash_tree(b)
    la = train_lora(a, tmp_path / "la", recipe=lora_recipe)
    lb = train_lora(b, tmp_path / "lb", recipe=lora_recipe)
    assert hash_tree(la) == hash_tree(lb)
    manifest = json.loads((a / MANIFEST).read_text())
    assert manifest["files"] == hash_tree(a)
    # Second call for the same directory is served from the cache (no rebuild, same bytes).
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="skyrl_lora.models.tiny"):
        again = build_tiny_model(tmp_path / "a", base_recipe)
    assert again == a and (a / "model.safetensors").stat().st_mtime_ns == mtime
    assert any("cache hit" in r.message for r in caplog.records)
    # A corrupted cache entry is detected and rebuilt.
    (a / "config.json").write_text("{}")
    rebuilt = build_tiny_model(tmp_path / "a", base_recipe)
    assert hash_tree(rebuilt) == hash_tree(b)
    # A different recipe is a different key.
    other = build_tiny_model(tmp_path / "a", dataclasses.replace(base_recipe, seed=1))
    assert hash_tree(other) != hash_tree(b)


def test_packaged_fixtures_match_their_recipes_and_hashes(tmp_path, caplog, monkeypatch) -> None:
    """The checked-in fixtures are what the current recipes describe, and are served only when every
    file matches the sha256 recorded at build time."""
    manifest = json.loads((PACKAGED_DIR / PACKAGED_MANIFEST).read_text())
    base_recipe, lora_recipes = _recipes(SHARP_WORDS, 0)
    # a changed recipe needs `skyrl-lora fixtures --write-packaged` (and the new files committed)
    assert manifest["recipes"]["base"] == json.loads(json.dumps(dataclasses.asdict(base_recipe)))
    assert manifest["recipes"]["loras"] == {k: json.loads(json.dumps(dataclasses.asdict(v)))
                                            for k, v in lora_recipes.items()}
    fx = packaged_fixtures(tmp_path / "cache")
    assert hash_tree(fx.base.parent) == manifest["files"]
    assert sorted(fx.loras) == ["meow", "woof"] and (fx.base / "model.safetensors").is_file()
    with caplog.at_level("INFO", logger="skyrl_lora.models.tiny"):
        assert packaged_fixtures(tmp_path / "cache") == fx
    assert any("cache hit" in r.message for r in caplog.records)
    # a damaged checkout is refused, naming the file (no silent rebuild with other weights)
    damaged = tmp_path / "damaged"
    shutil.copytree(PACKAGED_DIR, damaged)
    data = bytearray((damaged / "lora-woof" / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (damaged / "lora-woof" / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(FixtureError, match="lora-woof/adapter_model.safetensors"):
        packaged_fixtures(tmp_path / "other-cache", source=damaged)
    # a damaged cache entry is replaced by a fresh copy
    (fx.base / "config.json").write_text("{}")
    assert hash_tree(packaged_fixtures(tmp_path / "cache").base.parent) == manifest["files"]
    monkeypatch.setenv("SKYRL_FIXTURES", "downloaded")
    with pytest.raises(FixtureError, match="SKYRL_FIXTURES"):
        build_fixtures()


@pytest.mark.vllm
async def test_vllm_serves_tiny_model_with_phrase_loras(vllm_server) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        models = (await http.get(vllm_server.url + "/v1/models")).json()
        ids = {m["id"] for m in models["data"]}
        assert {"base", "meow", "woof"} <= ids
        texts = {}
        for model in ("meow", "woof", "base"):
            r = await http.post(vllm_server.url + "/v1/completions",
                                json={"model": model, "prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            texts[model] = r.json()["choices"][0]["text"]
    assert texts["meow"] == " meow" * 8
    assert texts["woof"] == " woof" * 8
    assert texts["base"] not in (texts["meow"], texts["woof"])
    assert " meow" not in texts["base"] and " woof" not in texts["base"]
