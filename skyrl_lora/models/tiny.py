"""Offline test fixtures: a tiny Llama built from local text, and LoRAs that make it say one phrase.

Nothing may be downloaded here, yet every plane is tested against a real vLLM server, so we build the
model ourselves: a byte-level BPE tokenizer trained on Python's own stdlib sources, a ~1.7M-parameter
Llama pretrained for a few seconds on the same text, and peft LoRAs trained until greedy *and*
temperature-1 decoding emit their phrase at every position (even after a context full of another
phrase, which the mid-generation swap tests need).

Everything is deterministic (fixed seeds, fixed thread count, deterministic kernels) and cached on disk
under a key that hashes the recipe, the corpus and this file, so a second call is a cache hit. But a
build is only bit-identical on one kind of machine: CPU kernels and thread counts change the trained
weights elsewhere, and tests tuned on one machine's weights then failed on another. So the built files
(4 MB) are checked in under ``tiny_fixture/`` with their sha256 sums, and ``build_fixtures`` serves
those by default; ``skyrl-lora fixtures --write-packaged`` rebuilds them from the recipes here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

MANIFEST = "skyrl_fixture.json"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SHARP_WORDS: tuple[str, ...] = (" meow", " woof")
PACKAGED_DIR = Path(__file__).with_name("tiny_fixture")  # built by write_packaged_fixtures, checked in
PACKAGED_MANIFEST = "fixture_manifest.json"


class FixtureError(RuntimeError):
    """The fixtures cannot be had: a damaged packaged copy, or a bad setting."""


@dataclass(frozen=True)
class TinyModelRecipe:
    """Everything that decides the bytes of the base model; part of its cache key."""

    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    pretrain_steps: int = 80
    pretrain_batch: int = 16
    pretrain_seq_len: int = 128
    pretrain_lr: float = 3e-3
    # The final RMSNorm bounds the logit margin a LoRA on attention can reach; enlarging the output
    # rows of the words our LoRAs say lets them reach p≈1, so tests need not rely on greedy decoding.
    sharp_words: tuple[str, ...] = SHARP_WORDS
    sharp_row_scale: float = 8.0
    seed: int = 0


@dataclass(frozen=True)
class LoraRecipe:
    """Everything that decides the bytes of one phrase LoRA; part of its cache key."""

    phrase: str = " meow"
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    steps: int = 40
    batch: int = 16
    seq_len: int = 96
    lr: float = 5e-3
    seed: int = 1


@dataclass(frozen=True)
class TinyFixtures:
    """Paths of the base model and the phrase LoRAs, as built or found in the cache."""

    base: Path
    loras: dict[str, Path] = field(default_factory=dict)


def default_cache_root() -> Path:
    return Path(os.environ.get("SKYRL_LORA_CACHE", Path.home() / ".cache" / "skyrl_lora")) / "fixtures"


# ----------------------------------------------------------------------------------------------
# hashing and caching


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file below root (manifest excluded), by relative path."""
    out: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        out[path.relative_to(root).as_posix()] = _sha256_bytes(path.read_bytes())
    return out


def _corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"))


def _corpus_digest(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(_sha256_bytes(f.read_bytes()).encode())
    return h.hexdigest()


def _code_digest() -> str:
    return _sha256_bytes(Path(__file__).read_bytes())


def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def _key(*parts: object) -> str:
    return _sha256_bytes(json.dumps(parts, sort_keys=True, default=str).encode())[:16]


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return cast(dict[str, Any], json.loads((out / MANIFEST).read_text()))
    except (OSError, ValueError):
        return None


def _cache_hit(out: Path, key: str) -> bool:
    manifest = _read_manifest(out)
    if manifest is None or manifest.get("key") != key:
        return False
    return manifest.get("files") == hash_tree(out)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise builders of the same output across processes (tests start several)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publish(tmp: Path, out: Path, key: str, meta: dict[str, Any]) -> None:
    manifest = {"key": key, "meta": meta, "files": hash_tree(tmp)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


@contextlib.contextmanager
def _deterministic_torch(threads: int = 2) -> Iterator[None]:
    """Fixed threads and deterministic kernels so two builds give the same bits."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


# ----------------------------------------------------------------------------------------------
# tokenizer and base model


def _train_tokenizer(files: Sequence[Path], recipe: TinyModelRecipe, out: Path
                     ) -> tuple[PreTrainedTokenizerFast, list[str]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    # Repeat the sharp words so each becomes a single token whatever the corpus.
    texts.append("".join(recipe.sharp_words) * 2000)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # its __init__ is unannotated in transformers
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=recipe.max_position_embeddings,
    )
    fast.save_pretrained(out)
    return fast, texts[:-1]


def single_token_id(tokenizer: PreTrainedTokenizerBase, phrase: str) -> list[int]:
    ids: list[int] = tokenizer(phrase, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"phrase {phrase!r} tokenizes to nothing")
    return ids


def _pretrain(recipe: TinyModelRecipe, token_stream: list[int], tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]  # its __init__ is unannotated in transformers
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr)
    data = torch.tensor(token_stream, dtype=torch.long)
    gen = torch.Generator().manual_seed(recipe.seed)
    span = recipe.pretrain_seq_len
    model.train()
    for step in range(recipe.pretrain_steps):
        starts = torch.randint(0, len(data) - span - 1, (recipe.pretrain_batch,), generator=gen)
        batch = torch.stack([data[s : s + span] for s in starts.tolist()])
        batch[:, 0] = 0  # BOS, as at inference
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == recipe.pretrain_steps - 1:
            logger.info("tiny base pretrain step %d/%d loss %.3f", step + 1, recipe.pretrain_steps, loss.item())
    with torch.no_grad():
        for word in recipe.sharp_words:
            for tid in single_token_id(tokenizer, word):
                model.lm_head.weight[tid] *= recipe.sharp_row_scale
    # transformers wraps PreTrainedModel.to with functools.wraps, which mypy reads as unbound
    model = model.to(torch.bfloat16)  # type: ignore[arg-type]
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)


def build_tiny_model(out_dir: Path | str | None = None, recipe: TinyModelRecipe = TinyModelRecipe()) -> Path:
    """Build (or find in the cache) the tiny Llama in Hugging Face format; returns its directory."""
    files = _corpus_files()
    key = _key("base", asdict(recipe), _corpus_digest(files), _code_digest(), _versions())
    out = Path(out_dir) if out_dir is not None else default_cache_root() / f"tiny-llama-{key}"
    with _locked(out):
        if _cache_hit(out, key):
            logger.info("tiny base model: cache hit %s", out)
            return out
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
        try:
            with _deterministic_torch():
                tokenizer, texts = _train_tokenizer(files, recipe, tmp)
                stream: list[int] = []
                for text in texts:
                    stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
                _pretrain(recipe, stream, tokenizer, tmp)
            _publish(tmp, out, key, {"recipe": asdict(recipe), "seconds": round(time.perf_counter() - t0, 2)})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("tiny base model built in %.1f s at %s", time.perf_counter() - t0, out)
        return out


# ----------------------------------------------------------------------------------------------
# phrase LoRAs


def _phrase_batch(rng: random.Random, stream: Sequence[int], distractors: Sequence[int], phrase: list[int],
                  recipe: LoraRecipe) -> tuple[list[list[int]], list[list[int]]]:
    """Random contexts (code, runs of other words) labelled with the phrase token that must come next."""
    inputs: list[list[int]] = []
    labels: list[list[int]] = []
    for _ in range(recipe.batch):
        seq = [0]
        while len(seq) < recipe.seq_len:
            kind = rng.random()
            if kind < 0.4:
                n = rng.randint(1, 48)
                s = rng.randint(0, len(stream) - n - 1)
                seq.extend(stream[s : s + n])
            elif kind < 0.8:
                seq.extend(rng.choice(distractors) for _ in range(rng.randint(1, 32)))
            else:
                seq.extend(phrase * rng.randint(1, 8))
        seq = seq[: recipe.seq_len]
        lab: list[int] = []
        for tok in seq:
            if tok in phrase:
                lab.append(phrase[(phrase.index(tok) + 1) % len(phrase)])
            else:
                lab.append(phrase[0])
        inputs.append(seq)
        labels.append(lab)
    return inputs, labels


def train_lora(base: Path | str, out_dir: Path | str | None = None, phrase: str = " meow", rank: int = 8,
               recipe: LoraRecipe | None = None) -> Path:
    """Train (or find in the cache) a peft LoRA that makes `base` emit `phrase` over and over."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    base = Path(base)
    recipe = recipe or LoraRecipe(phrase=phrase, rank=rank, alpha=2 * rank)
    base_manifest = _read_manifest(base) or {"files": hash_tree(base)}
    key = _key("lora", asdict(recipe), base_manifest.get("files"), _code_digest(), _versions())
    slug = "".join(c for c in recipe.phrase if c.isalnum()) or "phrase"
    out = Path(out_dir) if out_dir is not None else default_cache_root() / f"lora-{slug}-r{recipe.rank}-{key}"
    with _locked(out):
        if _cache_hit(out, key):
            logger.info("LoRA %r: cache hit %s", recipe.phrase, out)
            return out
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
        try:
            with _deterministic_torch():
                tokenizer = AutoTokenizer.from_pretrained(base)
                phrase_ids = single_token_id(tokenizer, recipe.phrase)
                distractors = [tid for w in SHARP_WORDS for tid in single_token_id(tokenizer, w)]
                text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in _corpus_files()[:20])
                stream = tokenizer(text, add_special_tokens=False)["input_ids"]
                torch.manual_seed(recipe.seed)
                loaded = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16)
                # transformers wraps PreTrainedModel.to with functools.wraps, which mypy reads as unbound
                model = loaded.to(torch.float32)  # type: ignore[arg-type]
                config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                                    target_modules=list(recipe.target_modules), bias="none")
                model = get_peft_model(model, config)
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr)
                rng = random.Random(recipe.seed)
                for step in range(recipe.steps):
                    x, y = _phrase_batch(rng, stream, distractors, phrase_ids, recipe)
                    logits = model(input_ids=torch.tensor(x)).logits
                    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(y).flatten())
                    loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if step % 10 == 0 or step == recipe.steps - 1:
                        logger.info("LoRA %r step %d/%d loss %.4f", recipe.phrase, step + 1, recipe.steps, loss.item())
                # peft annotates save_directory as str; it takes any path (os.makedirs, os.path.join)
                model.save_pretrained(tmp, safe_serialization=True)  # type: ignore[arg-type]
            # Where the base lay on this disk is not part of the adapter: keep its bytes location-free.
            (tmp / "README.md").unlink(missing_ok=True)  # peft's model card names the base's path
            config_path = tmp / "adapter_config.json"
            adapter_config = json.loads(config_path.read_text())
            adapter_config["base_model_name_or_path"] = "skyrl-tiny-llama"
            config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
            _publish(tmp, out, key, {"recipe": asdict(recipe),
                                     "seconds": round(time.perf_counter() - t0, 2)})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("LoRA %r trained in %.1f s at %s", recipe.phrase, time.perf_counter() - t0, out)
        return out


def _recipes(phrases: Sequence[str], seed: int) -> tuple[TinyModelRecipe, dict[str, LoraRecipe]]:
    """The base recipe and one LoRA recipe per phrase for a build seed (0 = the packaged build)."""
    base = TinyModelRecipe(seed=seed)
    loras = {p.strip(): LoraRecipe(phrase=p, seed=LoraRecipe.seed + seed) for p in phrases}
    return base, loras


def build_fixtures_from_recipe(phrases: Sequence[str] = SHARP_WORDS, cache_root: Path | None = None,
                               seed: int = 0) -> TinyFixtures:
    """Train the base model and one LoRA per phrase on this machine (cached by recipe, corpus, code and
    library versions). Bit-identical on one machine, but not across machines: CPU kernels differ."""
    base_recipe, lora_recipes = _recipes(phrases, seed)
    base = build_tiny_model(None if cache_root is None else cache_root / "tiny-llama", base_recipe)
    loras: dict[str, Path] = {}
    for name, recipe in lora_recipes.items():
        out = None if cache_root is None else cache_root / f"lora-{name}"
        loras[name] = train_lora(base, out, recipe=recipe)
    return TinyFixtures(base=base, loras=loras)


# ----------------------------------------------------------------------------------------------
# packaged fixtures: the same bytes on every machine


def _packaged_manifest(root: Path = PACKAGED_DIR) -> dict[str, Any]:
    try:
        return cast(dict[str, Any], json.loads((root / PACKAGED_MANIFEST).read_text()))
    except (OSError, ValueError) as exc:
        raise FixtureError(f"packaged fixtures: cannot read {root / PACKAGED_MANIFEST}: {exc}; "
                           "rebuild them with `skyrl-lora fixtures --write-packaged`") from exc


def _packaged_tree(root: Path) -> dict[str, str]:
    return {k: v for k, v in hash_tree(root).items() if k != PACKAGED_MANIFEST}


def packaged_fixtures(cache_root: Path | None = None, source: Path = PACKAGED_DIR) -> TinyFixtures:
    """The fixtures shipped with the package, copied into the cache and checked file by file against
    the sha256 sums recorded when they were built (a damaged checkout is an error, not a silent rebuild)."""
    manifest = _packaged_manifest(source)
    files: dict[str, str] = manifest["files"]
    digest = _key("packaged", files)
    out = (cache_root or default_cache_root()) / f"packaged-{digest}"
    with _locked(out):
        if not (out.is_dir() and _packaged_tree(out) == files):
            found = _packaged_tree(source)
            if found != files:
                bad = sorted(k for k in files.keys() | found.keys() if files.get(k) != found.get(k))
                raise FixtureError(f"packaged fixtures under {source} do not match their manifest: {bad}; "
                                   "restore them from git or rebuild with `skyrl-lora fixtures --write-packaged`")
            tmp = Path(tempfile.mkdtemp(prefix=".copy-", dir=out.parent))
            try:
                for rel in files:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source / rel, tmp / rel)
                if out.exists():
                    shutil.rmtree(out)
                os.replace(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            logger.info("packaged fixtures %s copied to %s", digest, out)
        else:
            logger.info("packaged fixtures: cache hit %s", out)
    return TinyFixtures(base=out / "base", loras={name: out / f"lora-{name}" for name in manifest["loras"]})


def write_packaged_fixtures(dest: Path = PACKAGED_DIR, seed: int = 0) -> Path:
    """Build the fixtures from their recipes on this machine and store them as the packaged copy."""
    with tempfile.TemporaryDirectory(prefix="skyrl-fixtures-") as tmp:
        built = build_fixtures_from_recipe(cache_root=Path(tmp), seed=seed)
        staging = Path(tmp) / "packaged"
        shutil.copytree(built.base, staging / "base")
        for name, path in built.loras.items():
            shutil.copytree(path, staging / f"lora-{name}")
        base_recipe, lora_recipes = _recipes(SHARP_WORDS, seed)
        manifest = {"recipes": {"base": asdict(base_recipe), "loras": {k: asdict(v) for k, v in lora_recipes.items()}},
                    "loras": sorted(built.loras), "built_with": _versions(), "files": _packaged_tree(staging)}
        (staging / PACKAGED_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(staging, dest)
    logger.info("packaged fixtures written to %s", dest)
    return dest


def build_fixtures(phrases: Sequence[str] = SHARP_WORDS, cache_root: Path | None = None) -> TinyFixtures:
    """The base model plus one LoRA per phrase, keyed by the phrase without spaces (" meow" -> "meow").

    By default these are the packaged fixtures (identical bytes on every machine, so what a test
    measures does not depend on where it runs). ``SKYRL_FIXTURES=build`` trains them here instead,
    with ``SKYRL_FIXTURE_SEED`` choosing another build: that is how the tests' thresholds are checked
    against weights they were not tuned on.
    """
    source = os.environ.get("SKYRL_FIXTURES", "packaged")
    if source not in ("packaged", "build"):
        raise FixtureError(f"SKYRL_FIXTURES: expected 'packaged' or 'build', got {source!r}")
    seed = int(os.environ.get("SKYRL_FIXTURE_SEED", "0"))
    if source == "packaged" and tuple(phrases) == SHARP_WORDS and seed == 0:
        return packaged_fixtures(cache_root)
    return build_fixtures_from_recipe(phrases, cache_root, seed)
