"""The upload store a server keeps versions sent to it in (servers on another node than the trainer):
only the adapter's two files, a size limit, nothing left of a refused upload, old unused ones swept."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from skyrl_lora.inference.uploads import ADAPTER_FILES, UploadError, UploadStore


async def _chunks(data: bytes, size: int = 4) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def test_an_upload_is_complete_only_with_both_files(tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "up", max_bytes=100, ttl_s=60)
    assert await store.receive("v1", ADAPTER_FILES[0], _chunks(b'{"r": 8}'), in_use=()) == 8
    with pytest.raises(UploadError) as err:
        store.path("v1")  # the weights are still missing
    assert err.value.status == 400 and err.value.field == "upload_id"
    await store.receive("v1", ADAPTER_FILES[1], _chunks(b"x" * 40), in_use=())
    folder = store.path("v1")
    assert (folder / ADAPTER_FILES[1]).read_bytes() == b"x" * 40 and store.owns(folder)
    store.remove(folder)
    assert not folder.exists()
    store.remove(tmp_path)  # not the store's: left alone
    assert tmp_path.exists()


async def test_bad_uploads_are_refused_and_leave_nothing(tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "up", max_bytes=10, ttl_s=60)
    with pytest.raises(UploadError) as err:
        await store.receive("v1", "../../etc/passwd", _chunks(b"x"), in_use=())
    assert err.value.status == 400 and err.value.field == "filename"
    with pytest.raises(UploadError) as err:
        await store.receive("v1", ADAPTER_FILES[1], _chunks(b"x" * 11), in_use=())
    assert err.value.status == 413 and ADAPTER_FILES[1] in err.value.message
    assert list((tmp_path / "up" / "v1").iterdir()) == []  # no partial file
    with pytest.raises(UploadError):
        store.path("../up")
    with pytest.raises(UploadError) as err:  # an id that would leave the store, before anything is written
        await store.receive("../outside", ADAPTER_FILES[0], _chunks(b"{}"), in_use=())
    assert err.value.status == 400 and err.value.field == "upload_id"
    assert not (tmp_path / "outside").exists()


async def test_old_uploads_nobody_uses_are_swept(tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "up", max_bytes=100, ttl_s=60)
    for upload in ("served", "orphan", "fresh"):
        for f in ADAPTER_FILES:
            await store.receive(upload, f, _chunks(b"{}"), in_use=())
    old = time.time() - 120
    for upload in ("served", "orphan"):
        os.utime(store.root / upload, (old, old))
    store.sweep(in_use=[str(store.root / "served")])
    assert sorted(p.name for p in store.root.iterdir()) == ["fresh", "served"]
