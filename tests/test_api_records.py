"""The API's record keeping on a real SQLite database, without Ray or vLLM: idempotency keys, checkpoint
expiry, signed download URLs, tinker paths, and what an inference server's open /metrics hides."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from skyrl_lora.api.db import CheckpointRow, Database, now
from skyrl_lora.api.expiry import CheckpointExpiry
from skyrl_lora.api.external import ExternalWeightsStore, parse_recipients
from skyrl_lora.api.idempotency import IdempotencyKeys
from skyrl_lora.api.paths import CheckpointKind, TinkerPath
from skyrl_lora.api.schemas import UntypedFuture
from skyrl_lora.errors import SkyrlError
from skyrl_lora.inference.access import redact_adapter_names


def test_an_idempotency_key_applies_a_request_once_even_across_a_restart(db_url: str) -> None:
    applied: list[str] = []

    async def scenario() -> None:
        keys = IdempotencyKeys(Database(db_url))

        async def submit() -> UntypedFuture:
            applied.append("x")
            await asyncio.sleep(0.05)  # concurrent copies arrive while the first is being submitted
            return UntypedFuture(request_id=f"req-{len(applied)}")

        first, *copies = await asyncio.gather(*(keys.once("alice", "k", "/r", b"{}", submit, UntypedFuture)
                                                for _ in range(5)))
        assert len(applied) == 1 and all(c == first for c in copies)
        with pytest.raises(SkyrlError) as other_body:
            await keys.once("alice", "k", "/r", b'{"a": 1}', submit, UntypedFuture)
        assert other_body.value.status == 409 and other_body.value.field == "X-Idempotency-Key"
        with pytest.raises(SkyrlError):
            await keys.once("alice", "k", "/other-route", b"{}", submit, UntypedFuture)
        bob = await keys.once("bob", "k", "/r", b"{}", submit, UntypedFuture)  # keys are per user
        assert bob != first and len(applied) == 2
        assert await keys.once("alice", None, "/r", b"{}", submit, UntypedFuture) != first  # no key: always applied

        restarted = IdempotencyKeys(Database(db_url))
        assert await restarted.once("alice", "k", "/r", b"{}", submit, UntypedFuture) == first
        assert await restarted.prune(now() + timedelta(seconds=1)) == 2
        assert await restarted.once("alice", "k", "/r", b"{}", submit, UntypedFuture) != first

    asyncio.run(scenario())


def test_a_failed_submit_is_not_remembered(db_url: str) -> None:
    async def scenario() -> None:
        keys = IdempotencyKeys(Database(db_url))

        async def broken() -> UntypedFuture:
            raise SkyrlError(404, "model_id: no model 'm'", "model_id")

        with pytest.raises(SkyrlError):
            await keys.once("alice", "k", "/r", b"{}", broken, UntypedFuture)

        async def ok() -> UntypedFuture:
            return UntypedFuture(request_id="req-ok")
        assert (await keys.once("alice", "k", "/r", b"{}", ok, UntypedFuture)).request_id == "req-ok"

    asyncio.run(scenario())


def test_expired_checkpoints_are_removed_when_they_expire_and_a_failed_removal_is_retried(db_url: str) -> None:
    removed: list[str] = []
    fail_once = {"tinker://r/weights/b"}

    async def remove(row: CheckpointRow) -> None:
        if row.tinker_path in fail_once:
            fail_once.clear()
            raise OSError("disk busy")
        removed.append(row.tinker_path)

    async def scenario() -> None:
        db = Database(db_url)
        expiry = CheckpointExpiry(db, remove, idle_check_s=60, retry_s=0.2)
        expiry.start()

        def add(name: str, ttl_s: float | None) -> None:
            db.run_sync(lambda s: s.add(CheckpointRow(
                tinker_path=f"tinker://r/weights/{name}", model_id="r", user_id="u", kind=CheckpointKind.TRAINING,
                name=name, internal_path=f"/x/{name}",
                expires_at=None if ttl_s is None else now() + timedelta(seconds=ttl_s))))
        add("a", 0.3)
        add("b", 0.3)
        add("kept", None)
        add("later", 3600)
        expiry.wake()
        def left() -> list[str]:
            return db.run_sync(lambda s: sorted(r.name for r in s.query(CheckpointRow).all()))

        deadline = asyncio.get_running_loop().time() + 60  # a condition with a deadline, generous for a loaded box
        while left() != ["kept", "later"] and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await expiry.stop()
        assert left() == ["kept", "later"]  # files first, then the row: both expired ones went, the others stay
        assert sorted(removed) == ["tinker://r/weights/a", "tinker://r/weights/b"]

    asyncio.run(scenario())


def test_download_urls_sign_one_file_of_one_checkpoint_until_they_expire(tmp_path: Path) -> None:
    store = ExternalWeightsStore(tmp_path, "k" * 64)
    path = TinkerPath("sess-1:train:0", CheckpointKind.EXTERNAL, "final")
    urls, expires = store.signed_urls("http://h:1/", path, ["a.json", "b.bin"])
    assert urls["a.json"].startswith("http://h:1/api/v1/external_weights/sess-1:train:0/final/a.json?expires=")
    signature = urls["a.json"].rsplit("signature=", 1)[1]
    store.check(path, "a.json", expires, signature)
    for bad in ((path, "b.bin", expires, signature), (path, "a.json", expires + 1, signature),
                (TinkerPath("sess-2:train:0", CheckpointKind.EXTERNAL, "final"), "a.json", expires, signature)):
        with pytest.raises(SkyrlError) as err:
            store.check(*bad)
        assert err.value.status == 403
    other_key = ExternalWeightsStore(tmp_path, "j" * 64)
    with pytest.raises(SkyrlError):
        other_key.check(path, "a.json", expires, signature)
    old, old_expiry = store.signed_urls("http://h:1", path, ["a.json"], lifetime_s=-1)
    with pytest.raises(SkyrlError, match="expired"):
        store.check(path, "a.json", old_expiry, old["a.json"].rsplit("signature=", 1)[1])


def test_exports_are_encrypted_to_the_recipients(tmp_path: Path) -> None:
    import pyrage

    identity = pyrage.x25519.Identity.generate()
    store = ExternalWeightsStore(tmp_path / "exports", "k" * 64)
    stored = store.write({"adapter_config.json": b"{}", "w.safetensors": b"\x00" * 100},
                         parse_recipients([str(identity.to_public())]))
    assert store.files(str(stored.directory)) == ["adapter_config.json.age", "w.safetensors.age"]
    assert pyrage.decrypt((stored.directory / "w.safetensors.age").read_bytes(), [identity]) == b"\x00" * 100
    plain = store.write({"a": b"1"}, [])
    assert (plain.directory / "a").read_bytes() == b"1" and plain.size_bytes == 1
    with pytest.raises(SkyrlError) as err:
        parse_recipients([str(identity.to_public()), "age1broken"])
    assert err.value.field == "age_encryption_recipients.1"
    with pytest.raises(SkyrlError):
        store.remove(str(tmp_path))  # only its own export directories


def test_tinker_paths_parse_once_into_their_parts() -> None:
    p = TinkerPath.parse("tinker://sess-1:train:0/sampler_weights/step-8")
    assert (p.run_id, p.kind, p.name, p.checkpoint_id) == ("sess-1:train:0", CheckpointKind.SAMPLER, "step-8",
                                                          "sampler_weights/step-8")
    assert str(p) == "tinker://sess-1:train:0/sampler_weights/step-8"
    assert TinkerPath.of("r", "external_weights/x").kind == CheckpointKind.EXTERNAL
    for bad in ("tinker://r/other/x", "tinker://r/weights/../x", "tinker://a/b/weights/x", "s3://r/weights/x"):
        with pytest.raises(SkyrlError) as err:
            TinkerPath.parse(bad, "model_path")
        assert err.value.status == 400 and err.value.field == "model_path"


def test_open_metrics_hide_the_series_that_name_adapters() -> None:
    text = (b'# HELP vllm:lora_requests_info Running stats on lora requests.\n'
            b'vllm:lora_requests_info{max_lora="8",running_lora_adapters="run-abc,run-def",waiting_lora_adapters=""} 1.7e9\n'
            b'vllm:num_requests_running{engine="0",model_name="base"} 2.0\n')
    out = redact_adapter_names(text)
    assert b"run-abc" not in out and b"vllm:num_requests_running" in out and b"# HELP" in out


def test_an_older_database_gets_the_new_columns_and_keeps_its_meaning(tmp_path: Path) -> None:
    """A database the first release made (with create_all: revision 0001's schema, no alembic_version)
    is upgraded on start, and a sampler marked expired the old way (its name "expired") is expired the
    new way."""
    import sqlalchemy
    from alembic import command
    from alembic.config import Config

    from skyrl_lora.api.db import MIGRATIONS, SamplerRow

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sqlalchemy.create_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        conn.execute(sqlalchemy.text("DROP TABLE alembic_version"))  # as create_all left it
        for sid, lora in (("s:sample:0", "expired"), ("s:sample:1", "run-1.ab")):
            conn.execute(sqlalchemy.text("INSERT INTO samplers VALUES (:sid, 'u', 's', 'b', NULL, :lora, NULL, "
                                         "'2026-01-01')"), {"sid": sid, "lora": lora})
    engine.dispose()
    db = Database(url)
    rows = db.run_sync(lambda s: {r.sampler_id: (r.expired, r.ephemeral) for r in s.query(SamplerRow).all()})
    assert rows == {"s:sample:0": (True, False), "s:sample:1": (False, False)}
    assert db.run_sync(lambda s: s.query(CheckpointRow).count()) == 0  # expires_at exists: the query works


def test_the_migrations_build_exactly_the_models_schema(db_url: str) -> None:
    """On SQLite and PostgreSQL: a new database upgraded to the newest revision has every table,
    column and index the models declare, and nothing else (Alembic's own comparison finds no change)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from skyrl_lora.api.db import Base

    db = Database(db_url)
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    db.close()
    assert diff == [], diff
